use std::path::{Path, PathBuf};

use super::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nodes")
}

fn pod(uid: &str) -> Pod {
    let mut p = Pod::default();
    p.metadata.uid = Some(uid.into());
    p
}

/// Every layout directory holds a `/proc` tree (`proc/PID/{cgroup,comm}`),
/// the node's `mounts`, and `expect`: per pod UID the netns and cgroup the
/// locator must find, or `ERROR` and part of the message.
#[test]
fn recorded_layouts() {
    let mut layouts = 0;
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let dir = entry.unwrap().path();
        // `@FIXTURE@`: the layout's own directory, for trees that must exist.
        let here = dir.display().to_string();
        let mounts = std::fs::read_to_string(dir.join("mounts")).unwrap().replace("@FIXTURE@", &here);
        let locator = ProcLocator::new(dir.join("proc"), &mounts);
        let expect = std::fs::read_to_string(dir.join("expect")).unwrap().replace("@FIXTURE@", &here);
        let mut cases = 0;
        for line in expect.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (uid, rest) = line.split_once(' ').unwrap();
            let (netns, cgroup) = rest.split_once(' ').unwrap();
            let got = locator.locate(&pod(uid));
            if netns == "ERROR" {
                let e = got.expect_err(&format!("{}: pod {uid} must not be found", dir.display()));
                assert!(e.contains(cgroup), "{}: {e}", dir.display());
            } else {
                let (n, c) = got.unwrap_or_else(|e| panic!("{}: pod {uid}: {e}", dir.display()));
                assert_eq!(n, dir.join(netns), "{}: netns of {uid}", dir.display());
                assert_eq!(c, PathBuf::from(cgroup), "{}: cgroup of {uid}", dir.display());
            }
            cases += 1;
        }
        assert!(cases > 0, "{}: no expectations", dir.display());
        // A pod that is not on the node is reported, not guessed.
        let e = locator.locate(&pod("11111111-2222-3333-4444-555555555555")).unwrap_err();
        assert!(e.contains("11111111-2222-3333-4444-555555555555") || e.contains("cgroup v2"), "{e}");
        layouts += 1;
    }
    assert!(layouts >= 8, "only {layouts} layouts under {}", fixtures().display());
}

#[test]
fn runtimes_are_recognised() {
    let uid = "6f3a1c2e-8b4d-4e5f-9a0b-1c2d3e4f5a6b";
    let sd = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f3a1c2e_8b4d_4e5f_9a0b_1c2d3e4f5a6b.slice";
    assert_eq!(pod_of(&format!("{sd}/cri-containerd-abc.scope")), Some((uid.into(), sd.into(), Runtime::Containerd)));
    assert_eq!(pod_of(&format!("{sd}/crio-abc.scope")).map(|p| p.2), Some(Runtime::CriO));
    assert_eq!(pod_of(&format!("{sd}/docker-abc.scope")).map(|p| p.2), Some(Runtime::Docker));
    assert_eq!(pod_of(&format!("/kubepods/pod{uid}/abc")), Some((uid.into(), format!("/kubepods/pod{uid}"), Runtime::Other)));
    // Not pods: system services, malformed UIDs.
    // Outside our cgroup namespace: kept relative, resolved by the locator.
    assert_eq!(pod_of(&format!("/../../{}/crio-abc.scope", &sd[1..])).map(|p| p.1), Some(format!("..{sd}")));
    assert_eq!(pod_of("/system.slice/kubelet.service"), None);
    assert_eq!(pod_of("/kubepods/podnotauid/abc"), None);
    assert_eq!(pod_of("/kubepods.slice/kubepods-podxyz.slice"), None);
}

#[test]
fn a_cgroup_v1_only_node_is_refused_with_the_reason() {
    let locator = ProcLocator::new(fixtures().join("containerd-cgroup2-systemd/proc"), "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n");
    let e = locator.locate(&pod("6f3a1c2e-8b4d-4e5f-9a0b-1c2d3e4f5a6b")).unwrap_err();
    assert!(e.contains("cgroup v2"), "{e}");
}
