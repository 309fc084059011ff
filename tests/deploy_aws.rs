//! The deployment files in `deploy/`, checked with the tools an operator would use: the
//! CloudFormation template passes `cfn-lint`, with the rules of what it promises
//! (`deploy/aws/stickless.rules`: Multi-AZ, encryption, IAM authentication, the health check on
//! `/readyz`); the Kubernetes manifests validate against Kubernetes' schemas
//! (`kubernetes-validate`) and keep the probes and the shutdown right; the Dockerfile builds a
//! small non-root image. And every `stickless` flag and `STICKLESS_*` variable these files and
//! `deploy/README.md` use exists in `stickless serve --help`, so they cannot drift from the binary;
//! and the launch template's user data parses as bash.
//!
//! `cfn-lint` and `kubernetes-validate` come from PyPI; `bash scripts/test.sh` installs them when
//! missing (`STICKLESS_TEST_CFN_LINT`, `STICKLESS_TEST_KUBERNETES_VALIDATE` and
//! `STICKLESS_TEST_YAML_PYTHON`, a Python that imports PyYAML, say where they are).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// Flags the deployment files use that work in progress adds to stickless: IAM authentication to
/// ElastiCache and the drain at shutdown. Remove each one once `stickless serve --help` has it (the
/// test fails until then, so that the list cannot outlive its reason).
const PENDING: &[&str] = &[];

/// How long one run of an external tool may take.
const TOOL_LIMIT: Duration = Duration::from_secs(180);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// `var` when set, else `name` when it is on `PATH`; otherwise the test fails saying what to install.
fn tool(var: &str, name: &str, install: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "{name} not found: {install} (bash scripts/test.sh installs it), or set {var} to its path"
        )
    })
}

/// Runs `cmd` to its end, failing the test if it runs longer than [`TOOL_LIMIT`].
fn run(mut cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TOOL_LIMIT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            // Not yet reaped (the waiting thread holds it), so the pid is still our child's.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{what} did not finish within {TOOL_LIMIT:?}");
        }
    }
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cloudformation_template_passes_cfn_lint_and_its_own_rules() {
    let cfn_lint = tool(
        "STICKLESS_TEST_CFN_LINT",
        "cfn-lint",
        "pip install cfn-lint",
    );
    let mut cmd = Command::new(cfn_lint);
    cmd.current_dir(repo(""))
        .args(["--custom-rules", "deploy/aws/stickless.rules"])
        .arg("deploy/aws/stickless.yaml");
    // Errors and warnings both fail (cfn-lint's status is 2 for errors, 4 for warnings).
    assert_success(&run(cmd), "cfn-lint deploy/aws/stickless.yaml");
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let validate = tool(
        "STICKLESS_TEST_KUBERNETES_VALIDATE",
        "kubernetes-validate",
        "pip install kubernetes-validate",
    );
    let mut cmd = Command::new(validate);
    // --strict: an unknown field (a typo in a securityContext) is an error, not ignored.
    cmd.current_dir(repo("")).args([
        "--strict",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/service.yaml",
        "deploy/kubernetes/secret.example.yaml",
    ]);
    assert_success(&run(cmd), "kubernetes-validate deploy/kubernetes/*.yaml");
}

/// The YAML documents of `path`, as JSON values (through PyYAML: the test has no YAML parser).
fn yaml_documents(path: &str) -> Vec<Value> {
    let python = tool(
        "STICKLESS_TEST_YAML_PYTHON",
        "python3",
        "install python3 with PyYAML (apt-get install python3-yaml, or pip install pyyaml)",
    );
    let mut cmd = Command::new(&python);
    cmd.args([
        "-c",
        "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
    ])
    .arg(repo(path));
    let out = run(cmd);
    assert_success(
        &out,
        &format!(
            "reading {path} with {} (needs PyYAML: apt-get install python3-yaml, or pip install pyyaml)",
            python.display()
        ),
    );
    match serde_json::from_slice(&out.stdout).expect("PyYAML's documents as JSON") {
        Value::Array(docs) => docs,
        other => panic!("{path}: not a list of documents: {other}"),
    }
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in the pod: {pod}"))
}

/// The value of the environment variable `name` in a container's `env` list.
fn env_value<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e.get("value").unwrap_or(&e["valueFrom"]))
}

/// Seconds in a stickless duration such as `10s`, `500ms` or `1m`.
fn seconds(d: &str) -> f64 {
    let (n, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len()));
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("duration {d}"));
    match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => panic!("duration {d}: unit {unit}"),
    }
}

/// The port number a container's `ADDR` setting listens on (`0.0.0.0:9180` -> 9180).
fn port_of(addr: &Value) -> u64 {
    let s = addr.as_str().expect("a literal address");
    s.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("HOST:PORT")
}

/// The containerPort of the named port of a container.
fn named_port(c: &Value, name: &str) -> u64 {
    c["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port named {name} in {}", c["name"]))
}

#[test]
fn kubernetes_pod_probes_stickless_and_lets_it_drain() {
    let docs = yaml_documents("deploy/kubernetes/deployment.yaml");
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let stickless = container(pod, "stickless");
    let app = container(pod, "app");

    // Probes on the admin listener, which must listen beyond loopback for the kubelet to reach it.
    let admin = env_value(stickless, "STICKLESS_ADMIN_LISTEN").expect("STICKLESS_ADMIN_LISTEN set");
    assert!(
        admin.as_str().is_some_and(|a| !a.starts_with("127.")),
        "the admin listener must be reachable by the kubelet: {admin}"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &stickless[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}: {get}");
        assert_eq!(get["port"], "admin", "{probe} on the admin port: {get}");
    }
    assert_eq!(named_port(stickless, "admin"), port_of(admin));

    // Traffic reaches stickless, never the app: the app listens on loopback and exposes nothing.
    let listen = env_value(stickless, "STICKLESS_LISTEN").expect("STICKLESS_LISTEN set");
    assert_eq!(named_port(stickless, "http"), port_of(listen));
    let upstream = env_value(stickless, "STICKLESS_UPSTREAM").expect("STICKLESS_UPSTREAM set");
    assert!(
        upstream
            .as_str()
            .is_some_and(|u| u.starts_with("http://127.0.0.1:")),
        "the app is reached on loopback: {upstream}"
    );
    assert!(app.get("ports").is_none(), "the app exposes no port: {app}");
    let service = yaml_documents("deploy/kubernetes/service.yaml");
    let ports = &service[0]["spec"]["ports"];
    assert_eq!(service[0]["kind"], "Service");
    assert_eq!(ports.as_array().map(Vec::len), Some(1), "{ports}");
    assert_eq!(
        ports[0]["targetPort"], "http",
        "the Service targets stickless: {ports}"
    );

    // Secrets from a Secret, never written in the manifest.
    for name in ["STICKLESS_SECRET_KEYS", "STICKLESS_REDIS_URL"] {
        let v = env_value(stickless, name).unwrap_or_else(|| panic!("{name} set"));
        assert!(
            v["secretKeyRef"]["name"].is_string(),
            "{name} comes from a Secret: {v}"
        );
    }

    // SIGTERM: stickless drains by itself; Kubernetes must not kill it before it is done.
    let drain = env_value(stickless, "STICKLESS_DRAIN_DELAY").expect("STICKLESS_DRAIN_DELAY set");
    let shutdown =
        env_value(stickless, "STICKLESS_SHUTDOWN_TIMEOUT").expect("STICKLESS_SHUTDOWN_TIMEOUT set");
    let drain = seconds(drain.as_str().expect("a literal duration"));
    let grace = pod["terminationGracePeriodSeconds"]
        .as_f64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > drain + seconds(shutdown.as_str().expect("a literal duration")),
        "terminationGracePeriodSeconds {grace} must exceed the drain delay plus the shutdown timeout"
    );
    // The app keeps serving while stickless still forwards to it.
    let sleep = app["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .and_then(|c| c.get(1))
        .and_then(|s| s.as_str())
        .and_then(|s| s.parse::<f64>().ok())
        .expect("the app's preStop sleeps");
    assert!(
        sleep > drain,
        "the app's preStop ({sleep}s) outlasts the drain delay ({drain}s)"
    );

    // Least privilege, for both containers.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    for c in [stickless, app] {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", c["name"]);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{}",
            c["name"]
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{} has a memory limit",
            c["name"]
        );
    }
}

#[test]
fn dockerfile_is_multi_stage_and_runs_as_non_root() {
    let dockerfile = read("deploy/docker/Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    assert!(
        dockerfile.contains("cargo build --release --locked"),
        "built from the lockfile"
    );
    let runtime = &instructions[*stages.last().unwrap()..];
    assert!(
        runtime.iter().any(|l| l.starts_with("COPY --from=")),
        "the runtime stage takes the binary from the build stage"
    );
    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap_or(user);
    assert!(
        uid.parse::<u32>().is_ok_and(|n| n != 0),
        "USER is a non-root uid by number (for runAsNonRoot): {user}"
    );
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT") && l.contains("stickless")),
        "the entrypoint is stickless"
    );
}

/// `stickless serve --help`.
fn serve_help() -> String {
    let out = run({
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stickless"));
        cmd.args(["serve", "--help"]);
        cmd
    });
    assert_success(&out, "stickless serve --help");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// Whether the help text documents `--flag` (as a whole word).
fn help_has_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let after = help[i + flag.len()..].chars().next();
        !matches!(after, Some(c) if c.is_ascii_alphanumeric() || c == '-')
    })
}

/// Every `STICKLESS_*` name in `text` (the test harness's own `STICKLESS_TEST_*` aside).
fn env_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("STICKLESS_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !name.starts_with("STICKLESS_TEST_") && name.len() > "STICKLESS_".len() {
            names.insert(name);
        }
    }
    names
}

/// The flag an environment variable stands for: `STICKLESS_IDLE_TIMEOUT` -> `--idle-timeout`.
fn flag_of(env: &str) -> String {
    format!(
        "--{}",
        env["STICKLESS_".len()..]
            .to_ascii_lowercase()
            .replace('_', "-")
    )
}

/// Whether a command line runs stickless: its first word (after `$ ` or `sudo `) is `stickless`
/// or a path to it, or it holds a JSON-style argument list with "serve" (a Dockerfile's CMD, a
/// container's args). `aws iam ... --role-name stickless --policy-name ...` does not.
fn runs_stickless(line: &str) -> bool {
    let line = line.trim_start();
    let line = line.strip_prefix("$ ").unwrap_or(line);
    let line = line.strip_prefix("sudo ").unwrap_or(line);
    let first = line.split_whitespace().next().unwrap_or("");
    first == "stickless" || first.ends_with("/stickless") || line.contains("\"serve\"")
}

/// The `--flags` given to stickless in `text`: those on a command line that runs it (shell
/// continuations joined; see [`runs_stickless`]) and, in Markdown prose, any inline code span
/// that starts with `--`. Other programs' flags (aws, curl, pip) are left alone.
fn stickless_flags(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let mut take = |s: &str| {
        for (i, _) in s.match_indices("--") {
            let before = s[..i].chars().next_back();
            if matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '-') {
                continue;
            }
            let name: String = s[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect();
            if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                flags.insert(format!("--{name}"));
            }
        }
    };
    let mut logical = String::new();
    let mut in_code_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code_block = !in_code_block;
        }
        if !in_code_block {
            for (k, span) in line.split('`').enumerate() {
                if k % 2 == 1 && span.starts_with("--") {
                    take(span);
                }
            }
        }
        logical.push_str(line.trim_end_matches('\\'));
        logical.push(' ');
        if line.ends_with('\\') {
            continue;
        }
        if runs_stickless(&logical) {
            take(&logical);
        }
        logical.clear();
    }
    flags
}

#[test]
fn every_stickless_flag_the_deployment_files_use_exists() {
    let help = serve_help();
    let files = [
        "deploy/aws/stickless.yaml",
        "deploy/docker/Dockerfile",
        "deploy/kubernetes/deployment.yaml",
        "deploy/README.md",
    ];
    let mut unknown = Vec::new();
    let mut pending_used = BTreeSet::new();
    for file in files {
        let text = read(file);
        let envs = env_names(&text);
        let mut flags = stickless_flags(&text);
        flags.extend(envs.iter().map(|e| flag_of(e)));
        assert!(
            !flags.is_empty(),
            "{file}: no stickless setting found (is the scan broken?)"
        );
        for flag in &flags {
            if PENDING.contains(&flag.as_str()) {
                pending_used.insert(flag.clone());
            } else if !help_has_flag(&help, flag) {
                unknown.push(format!("{file}: {flag}"));
            }
        }
        for env in &envs {
            let documented =
                help.contains(&format!("[env: {env}=")) || help.contains(&format!("[env: {env}]"));
            if !PENDING.contains(&flag_of(env).as_str())
                && !documented
                && help_has_flag(&help, &flag_of(env))
            {
                unknown.push(format!(
                    "{file}: {env} (the flag exists, the variable does not)"
                ));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "settings that `stickless serve --help` does not know:\n  {}",
        unknown.join("\n  ")
    );
    let landed: Vec<&&str> = PENDING.iter().filter(|f| help_has_flag(&help, f)).collect();
    assert!(
        landed.is_empty(),
        "{landed:?} now exist in `stickless serve --help`: remove them from PENDING in {}",
        file!()
    );
    // The pending list names only flags still in use.
    let stale: Vec<&&str> = PENDING
        .iter()
        .filter(|f| !pending_used.contains(**f))
        .collect();
    assert!(
        stale.is_empty(),
        "{stale:?} are in PENDING but no file uses them"
    );
}

/// The scan above finds flags where stickless runs and nowhere else; a scan that found nothing
/// would let every file pass.
#[test]
fn the_flag_scan_finds_stickless_flags_and_only_them() {
    let text = "\
```sh
aws cloudformation deploy --stack-name x --capabilities CAPABILITY_IAM
aws iam put-role-policy --role-name stickless --policy-name stickless
stickless serve --listen 0.0.0.0:8080 \\
    --redis-url rediss://h:6379
```
With `--idle-timeout 30m` set, and `STICKLESS_KEY_PREFIX`. # --- stickless serve ---
ENTRYPOINT [\"stickless\"]
CMD [\"serve\", \"--cookie-secure\", \"true\"]
";
    let flags: Vec<String> = stickless_flags(text).into_iter().collect();
    assert_eq!(
        flags,
        [
            "--cookie-secure",
            "--idle-timeout",
            "--listen",
            "--redis-url"
        ]
    );
    assert_eq!(
        env_names("STICKLESS_KEY_PREFIX=x STICKLESS_TEST_PYTHON=y"),
        BTreeSet::from(["STICKLESS_KEY_PREFIX".to_string()])
    );
    assert_eq!(flag_of("STICKLESS_KEY_PREFIX"), "--key-prefix");
    let help = "      --redis-url <URL>\n      --redis-timeout <D>";
    assert!(help_has_flag(help, "--redis-url"));
    assert!(!help_has_flag(help, "--redis"));
}

/// The launch template's user data, as the instance gets it (CloudFormation's `${...}` left in
/// place: they stand where a word goes), parses as bash.
#[test]
fn user_data_is_valid_bash() {
    let template = read("deploy/aws/stickless.yaml");
    let start = template
        .find("#!/bin/bash")
        .expect("the user data's shebang");
    let indent = template[..start].len() - template[..start].trim_end_matches(' ').len();
    let script: String = template[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with(&" ".repeat(indent)) || l.starts_with("#!"))
        .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        script.contains("signal SUCCESS"),
        "the whole script: {script}"
    );
    let path = std::env::temp_dir().join(format!("stickless-user-data-{}.sh", std::process::id()));
    std::fs::write(&path, &script).expect("write the script");
    let mut cmd = Command::new("bash");
    cmd.arg("-n").arg(&path);
    let out = run(cmd);
    let _ = std::fs::remove_file(&path);
    assert_success(&out, "bash -n on the user data");
}
