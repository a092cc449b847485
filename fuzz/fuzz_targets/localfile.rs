#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| mesh_agent::fuzzing::localfile(text));
