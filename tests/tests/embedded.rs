//! The embedded default from other processes: `rialto-local serve`, then the tools a user runs
//! against any cluster (`rialto-admin`, `rialto-push`, `rialto-loadgen`), unchanged, with the
//! URL and endpoint it prints. No etcd, no broker.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use rialto_tests::sibling_binary;

/// `rialto-local serve`, stopped with SIGTERM when dropped.
struct Local {
    child: Child,
    controller: String,
    backends: String,
}

impl Local {
    fn start(data_dir: &std::path::Path) -> Result<Local> {
        let mut child = Command::new(sibling_binary("rialto-local")?)
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (mut controller, mut backends) = (None, None);
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(url) = line.strip_prefix("local: controller ") {
                controller = Some(url.to_string());
            }
            if let Some(rest) = line.strip_prefix("local: backends ") {
                backends = rest.split_whitespace().next().map(str::to_string);
            }
            if line.contains("ready") {
                break;
            }
        }
        match (controller, backends) {
            (Some(controller), Some(backends)) => Ok(Local {
                child,
                controller,
                backends,
            }),
            _ => {
                let _ = child.kill();
                bail!("rialto-local serve did not print its addresses")
            }
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // SIGTERM: a clean shutdown; then make sure.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn run(binary: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(sibling_binary(binary)?).args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{binary} {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

#[test]
fn admin_push_and_loadgen_work_against_rialto_local_serve() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let local = Local::start(&dir.path().join("data"))?;
    let controller = local.controller.as_str();
    run(
        "rialto-admin",
        &[
            "--controller",
            controller,
            "stores",
            "create",
            "words",
            "--key-schema",
            "\"string\"",
            "--value-schema",
            "\"string\"",
            "--partitions",
            "4",
            "--replication-factor",
            "2",
        ],
    )?;
    let input = dir.path().join("words.jsonl");
    let lines: String = (0..2000)
        .map(|i| format!("{{\"key\": \"k{i}\", \"value\": \"value {i}\"}}\n"))
        .collect();
    std::fs::write(&input, lines)?;
    let input = input.to_str().context("path")?;
    run(
        "rialto-push",
        &[
            "--controller",
            controller,
            "--store",
            "words",
            "--input",
            input,
        ],
    )?;

    let verified = run(
        "rialto-loadgen",
        &[
            "--etcd",
            &local.backends,
            "verify",
            "--store",
            "words",
            "--input",
            input,
            "--batch",
            "500",
        ],
    )?;
    assert!(
        verified.contains("verified 2000 keys") && verified.contains("0 missing, 0 wrong"),
        "{verified}"
    );
    let got = run(
        "rialto-loadgen",
        &[
            "--etcd",
            &local.backends,
            "get",
            "--store",
            "words",
            "--key",
            "\"k7\"",
        ],
    )?;
    assert_eq!(got.trim(), "\"value 7\"");
    let described = run(
        "rialto-admin",
        &["--controller", controller, "stores", "describe", "words"],
    )?;
    assert!(described.contains("current version     1"), "{described}");

    // Real-time writes from another process, to a hybrid store.
    run(
        "rialto-admin",
        &[
            "--controller",
            controller,
            "stores",
            "create",
            "feed",
            "--key-schema",
            "\"string\"",
            "--value-schema",
            "\"string\"",
            "--partitions",
            "2",
            "--replication-factor",
            "2",
            "--hybrid-rewind-seconds",
            "60",
            "--hybrid-lag-records-max",
            "100",
        ],
    )?;
    let writes = dir.path().join("writes.jsonl");
    std::fs::write(&writes, "{\"key\": \"m\", \"value\": \"fresh\"}\n")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // The store takes writes once its first (empty) version is live.
    while run(
        "rialto-push",
        &[
            "stream",
            "--controller",
            controller,
            "--store",
            "feed",
            "--input",
            writes.to_str().context("path")?,
        ],
    )
    .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the hybrid store never took writes"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    loop {
        let got = run(
            "rialto-loadgen",
            &[
                "--etcd",
                &local.backends,
                "get",
                "--store",
                "feed",
                "--key",
                "\"m\"",
            ],
        )
        .unwrap_or_default();
        if got.trim() == "\"fresh\"" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the real-time write never arrived: {got}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}
