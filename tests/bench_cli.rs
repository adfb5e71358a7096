//! `tandem bench generate` at tiny sizes: the last line of stdout is a JSON object with
//! positive throughput figures.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_generate_prints_positive_figures_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "bench",
            "generate",
            "--batch",
            "4",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
        ])
        .output()
        .expect("run tandem");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("some output");
    let report: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("last line not JSON ({e}): {last}"));
    for key in [
        "cached_tokens_per_s",
        "recompute_tokens_per_s",
        "cache_speedup",
        "train_tokens_per_s",
    ] {
        let v = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!(v > 0.0 && v.is_finite(), "{key} = {v}");
    }
    assert_eq!(report["batch"], 4);
    assert_eq!(report["new_tokens"], 4);
}

#[test]
fn bench_rejects_zero_sizes() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "generate", "--batch", "0"])
        .output()
        .expect("run tandem");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--batch"), "{stderr}");
}
