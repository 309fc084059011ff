//! deploy/stickless.service: `systemd-analyze verify` finds nothing to say about it (run offline
//! against a root of the test's own that holds the unit, the binary at its ExecStart path and the
//! system's own units), and it keeps what the service relies on: `Type=notify`, a restart on
//! failure, stop and start timeouts that fit stickless's own, and every hardening line.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::TempDir;

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/stickless.service")
}

fn unit() -> String {
    std::fs::read_to_string(unit_path()).unwrap()
}

fn systemd_analyze() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|d| d.join("systemd-analyze"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "systemd-analyze not found: install Debian's `systemd` package \
             (apt-get install systemd; scripts/test.sh installs it when missing)"
        )
    })
}

/// `systemd-analyze verify` on `unit_text` installed as `stickless.service` in a root of its own:
/// its exit status and everything it printed.
fn verify(unit_text: &str) -> (bool, String) {
    let root = TempDir::new("systemd-root");
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .expect("the system's unit directory (/usr/lib/systemd/system), from the systemd package");
    let lib = root.path.join("usr/lib/systemd");
    let etc = root.path.join("etc/systemd/system");
    let bin = root.path.join("usr/local/bin");
    for dir in [&lib, &etc, &bin] {
        std::fs::create_dir_all(dir).unwrap();
    }
    // The targets the unit is ordered against (and the ones they pull in), symlinks kept.
    let copied = Command::new("cp")
        .arg("-a")
        .arg(system_units)
        .arg(lib.join("system"))
        .status()
        .unwrap();
    assert!(copied.success(), "cannot copy {}", system_units.display());
    std::fs::copy(env!("CARGO_BIN_EXE_stickless"), bin.join("stickless")).unwrap();
    // ExecReload's `/bin/kill` (procps), which every Debian and Ubuntu system has.
    let kill = ["/bin/kill", "/usr/bin/kill"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .expect("/bin/kill (Debian's procps package)");
    std::fs::create_dir_all(root.path.join("bin")).unwrap();
    std::fs::copy(kill, root.path.join("bin/kill")).unwrap();
    let installed = etc.join("stickless.service");
    std::fs::write(&installed, unit_text).unwrap();
    let out = Command::new(systemd_analyze())
        .arg("verify")
        .arg(format!("--root={}", root.path.display()))
        .args(["--man=no", "--generators=no"])
        .arg(&installed)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let (ok, printed) = verify(&unit());
    assert!(
        ok && printed.trim().is_empty(),
        "systemd-analyze verify deploy/stickless.service:\n{printed}"
    );
}

#[test]
fn the_check_catches_a_broken_unit() {
    // verify exits 0 on a value it cannot parse and only prints a warning: the check must fail
    // on either.
    let broken = unit().replace("Type=notify", "Type=notfy");
    let (ok, printed) = verify(&broken);
    assert!(!ok || !printed.trim().is_empty(), "a broken unit passed");
    assert!(printed.contains("notfy"), "{printed}");
}

/// The value of `key=` in the unit's [Service] section (the last one when repeated).
fn setting(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .next_back()
}

fn seconds(unit: &str, key: &str) -> Duration {
    let v = setting(unit, key).unwrap_or_else(|| panic!("no {key}= in the unit"));
    Duration::from_secs(
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v}: whole seconds")),
    )
}

#[test]
fn the_unit_waits_for_ready_and_stops_within_its_timeouts() {
    let unit = unit();
    assert_eq!(setting(&unit, "Type").as_deref(), Some("notify"));
    assert_eq!(setting(&unit, "Restart").as_deref(), Some("on-failure"));
    assert_eq!(setting(&unit, "KillSignal").as_deref(), Some("SIGTERM"));
    // systemd sends SIGKILL at TimeoutStopSec: the default drain and shutdown must fit before.
    let stop = seconds(&unit, "TimeoutStopSec");
    let needed =
        stickless::config::DEFAULT_DRAIN_DELAY + stickless::config::DEFAULT_SHUTDOWN_TIMEOUT;
    assert!(
        stop > needed,
        "TimeoutStopSec={stop:?} is not above {needed:?}"
    );
    // READY=1 comes at the latest after READY_WAIT: systemd must not give up before.
    let start = seconds(&unit, "TimeoutStartSec");
    assert!(
        start > stickless::notify::READY_WAIT,
        "TimeoutStartSec={start:?}"
    );
}

#[test]
fn the_unit_keeps_its_hardening() {
    let unit = unit();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for line in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        // AF_UNIX is also what the notification socket needs.
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged @resources",
        "SystemCallErrorNumber=EPERM",
        "UMask=0077",
        "LimitNOFILE=65536",
    ] {
        assert!(lines.contains(&line), "{line} is missing from the unit");
    }
}
