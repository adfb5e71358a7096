use std::path::Path;
use tandem_runtime::{run, Config, RunOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe() {
    let name = std::env::var("CFG").unwrap();
    let sets: Vec<String> = std::env::var("SETS")
        .map(|s| s.split(';').filter(|x| !x.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    let cfg = Config::load(
        Path::new(&format!("{}/../configs/{name}.toml", env!("CARGO_MANIFEST_DIR"))),
        &sets,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let s = run(
        &cfg,
        RunOptions {
            run_dir: dir.path().into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for r in &s.reports {
        println!("{} v{} reward {:.3} score {:.3} kl {:.3} beta {:.3} pl {:.3} vl {:.3} ent {:.3} ev {:.2} stale {:.2} gen {:.2} learn {:.2} wall {:.1}", r.step, r.policy_version, r.stats.reward_mean, r.stats.score_mean, r.stats.kl, r.stats.beta, r.stats.policy_loss, r.stats.value_loss, r.stats.entropy, r.stats.explained_var, r.staleness_mean, r.generate_s, r.learn_s, r.wall_s);
    }
    println!("took {:?} held {} bound {}", t.elapsed(), s.max_held, s.held_bound);
}
