//! The proxy's edge parsers for `cargo fuzz` (feature `fuzzing` only).

use std::net::SocketAddr;

/// See [`super::http::validate::fuzz_front_door`].
pub fn front_door(data: &[u8], chunk: usize, decide: &dyn Fn(&http::Request<()>, &crate::policy::NormalizedPath<'_>)) {
    super::http::validate::fuzz_front_door(data, chunk, decide);
}

/// The CONNECT `:authority` as h2 hands it over, then the tunnel's parser.
pub fn connect_authority(authority: &str) -> Option<SocketAddr> {
    super::tunnel::connect_target(authority)
}
