//! Testbed::new sweeps what dead test processes left behind. In its own test
//! binary: any testbed starting in parallel would sweep the fake leftovers
//! while this test is still building them.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use mesh_e2e::Testbed;

/// Kills the stand-in orphan even if an assertion fails first.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn new_sweeps_leftovers_of_dead_test_processes() {
    // What a SIGKILLed test leaves: netns and a cgroup with a live process,
    // named after a PID that cannot exist (above the kernel's PID_MAX_LIMIT).
    let dead = "mt-sweep-4194305-0";
    let cg_root = mesh_e2e::cgroup2_mount().unwrap();
    let cg = cg_root.join("mesh-e2e").join(dead).join("pod");
    std::fs::create_dir_all(&cg).unwrap();
    for ns in [dead.to_string(), format!("{dead}-pod")] {
        if !Path::new("/run/netns").join(&ns).exists() {
            let st = Command::new("ip")
                .args(["netns", "add", &ns])
                .status()
                .unwrap();
            assert!(st.success(), "ip netns add {ns}");
        }
    }
    let mut orphan = KillOnDrop(
        Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::fs::write(cg.join("cgroup.procs"), orphan.0.id().to_string()).unwrap();

    let _tb = Testbed::new("sweeper").unwrap();
    assert!(!Path::new("/run/netns").join(dead).exists());
    assert!(!Path::new("/run/netns").join(format!("{dead}-pod")).exists());
    assert!(!cg.parent().unwrap().exists());
    let status = orphan.0.wait().unwrap();
    assert!(!status.success(), "the orphan was killed by the sweep");
}
