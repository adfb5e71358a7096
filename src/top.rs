//! `tandem top [--addr HOST:PORT | --run-dir DIR] [--once] [--interval SECONDS]`: a live table
//! of a run's actors, read from its Prometheus endpoint.
//!
//! One row per actor: kind, id, device, state (idle, computing, blocked, stopped), busy %
//! of the last sample interval, inbound queue depth/capacity, rate (tokens/s for rollout
//! actors, items/s for the others), policy-version lag and restarts. A header shows the run's
//! step out of its total, the ETA, the policy version, score, reward, KL and beta. The table is
//! redrawn in place every `--interval` seconds until the run ends or Ctrl-C; `--once` prints one
//! snapshot and exits, for scripts. `--run-dir` reads the endpoint's address from
//! `DIR/metrics_addr` (which a run writes once it serves, and removes when it ends), so a port
//! that another program holds is never read as the run's; an endpoint that serves no `tandem_`
//! series is refused as not a tandem run.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::error::bad_input;

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The run's metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:9184", conflicts_with = "run_dir")]
    addr: String,
    /// Find the endpoint of the run writing to this directory.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Print one snapshot and exit.
    #[arg(long)]
    once: bool,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
}

/// One sample of a series: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text exposition format (comments and blank lines skipped).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(match e {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}

/// One actor's row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub kind: String,
    pub actor: String,
    pub device: String,
    pub state: Option<f64>,
    pub busy: Option<f64>,
    pub depth: Option<f64>,
    pub capacity: Option<f64>,
    pub rate: Option<f64>,
    pub lag: Option<f64>,
    pub restarts: Option<f64>,
}

/// Groups the `tandem_actor_*` series by actor, in pipeline order.
pub fn rows(samples: &[Sample]) -> Vec<Row> {
    let mut by: BTreeMap<String, Row> = BTreeMap::new();
    for s in samples {
        let Some(actor) = s.labels.get("actor") else { continue };
        if !s.name.starts_with("tandem_actor_") {
            continue;
        }
        let r = by.entry(actor.clone()).or_insert_with(|| Row {
            kind: s.labels.get("kind").cloned().unwrap_or_default(),
            actor: actor.clone(),
            device: s.labels.get("device").cloned().unwrap_or_default(),
            ..Row::default()
        });
        let slot = match s.name.as_str() {
            "tandem_actor_state" => &mut r.state,
            "tandem_actor_busy_fraction" => &mut r.busy,
            "tandem_actor_queue_depth" => &mut r.depth,
            "tandem_actor_queue_capacity" => &mut r.capacity,
            "tandem_actor_rate" => &mut r.rate,
            "tandem_actor_version_lag" => &mut r.lag,
            "tandem_actor_restarts_total" => &mut r.restarts,
            _ => continue,
        };
        *slot = Some(s.value);
    }
    let order = |k: &str| {
        ["rollout", "reward", "value", "replay", "learner", "snapshot"]
            .iter()
            .position(|x| *x == k)
    };
    let mut v: Vec<Row> = by.into_values().collect();
    v.sort_by(|a, b| (order(&a.kind), &a.actor).cmp(&(order(&b.kind), &b.actor)));
    v
}

fn state_name(v: Option<f64>) -> &'static str {
    match v.map(|x| x as u8) {
        Some(0) => "idle",
        Some(1) => "computing",
        Some(2) => "blocked",
        Some(3) => "stopped",
        _ => "-",
    }
}

/// The table as text.
pub fn render(samples: &[Sample]) -> String {
    let gauge = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map(|s| s.value)
    };
    let fmt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |x| format!("{x:.digits$}"));
    let step = gauge("tandem_run_step").or(gauge("tandem_learner_steps"));
    let eta = gauge("tandem_run_eta_seconds")
        .filter(|s| s.is_finite())
        .map_or("-".to_string(), |s| format!("{}s", s.round()));
    let mut out = format!(
        "step {}/{}  eta {eta}  policy v{}  score {}  reward {}  kl {}  beta {}\n",
        fmt(step, 0),
        fmt(gauge("tandem_run_steps"), 0),
        fmt(gauge("tandem_policy_version"), 0),
        fmt(gauge("tandem_learner_score_mean"), 3),
        fmt(gauge("tandem_learner_reward_mean"), 3),
        fmt(gauge("tandem_learner_kl"), 3),
        fmt(gauge("tandem_learner_beta"), 4),
    );
    out.push_str(&format!(
        "{:<9} {:<20} {:<7} {:<10} {:>6} {:>7} {:>14} {:>4} {:>8}\n",
        "KIND", "ACTOR", "DEVICE", "STATE", "BUSY%", "QUEUE", "RATE", "LAG", "RESTARTS"
    ));
    for r in rows(samples) {
        let queue = match (r.depth, r.capacity) {
            (Some(d), Some(c)) => format!("{d:.0}/{c:.0}"),
            _ => "-".into(),
        };
        let unit = if r.kind == "rollout" { "tok/s" } else { "/s" };
        let rate = r.rate.map_or("-".into(), |x| format!("{x:.1} {unit}"));
        out.push_str(&format!(
            "{:<9} {:<20} {:<7} {:<10} {:>6} {:>7} {:>14} {:>4} {:>8}\n",
            r.kind,
            r.actor,
            r.device,
            state_name(r.state),
            r.busy.map_or("-".into(), |b| format!("{:.0}", b * 100.0)),
            queue,
            rate,
            fmt(r.lag, 0),
            fmt(r.restarts.or(Some(0.0)), 0),
        ));
    }
    out
}

fn scrape(addr: &str) -> anyhow::Result<String> {
    let sock = addr
        .to_socket_addrs()
        .with_context(|| format!("bad address {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(2))
        .with_context(|| format!("no tandem metrics endpoint at {addr} (is a run live?)"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let not_tandem = |what: String| format!("{addr} is not a tandem metrics endpoint: {what}");
    // One write; a server of another protocol may answer and close before taking all of it,
    // so what it sent is read even when the write fails.
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let wrote = s.write_all(request.as_bytes());
    // Bounded: a metrics page is small, and a server that streams forever must not fill memory.
    let mut raw = Vec::new();
    let read = (&mut s).take(64 << 20).read_to_end(&mut raw);
    if raw.is_empty() {
        let why = match (wrote, read) {
            (Err(e), _) => format!("it did not take the request: {e}"),
            (_, Err(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                "no answer within 5 s".to_string()
            }
            (_, Err(e)) => format!("reading its answer failed: {e}"),
            (Ok(()), Ok(_)) => "it closed the connection without an answer".to_string(),
        };
        anyhow::bail!(not_tandem(why));
    }
    let buf = String::from_utf8_lossy(&raw);
    let status = buf.lines().next().unwrap_or("").trim();
    if !(status.starts_with("HTTP/1.") && status.split_whitespace().nth(1) == Some("200")) {
        let shown: String = status.chars().take(60).collect();
        anyhow::bail!(not_tandem(format!("it answered {shown:?}")));
    }
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    if !body.lines().any(|l| l.starts_with("tandem_")) {
        anyhow::bail!("{addr} answers, but not with a tandem run's metrics (another program holds the port?)");
    }
    Ok(body.to_string())
}

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let addr = match &args.run_dir {
        Some(dir) => {
            let path = dir.join("metrics_addr");
            match std::fs::read_to_string(&path) {
                Ok(a) => a.trim().to_string(),
                Err(e) => return bad_input!("{}: {e} (is the run live, with metrics enabled?)", path.display()),
            }
        }
        None => args.addr.clone(),
    };
    let first = match scrape(&addr) {
        Ok(t) => t,
        Err(e) => return bad_input!("{e:#}"),
    };
    if args.once {
        print!("{}", render(&parse_exposition(&first)));
        return Ok(());
    }
    if args.interval.is_nan() || args.interval <= 0.0 {
        return bad_input!("--interval must be > 0");
    }
    let mut text = first;
    loop {
        let mut out = std::io::stdout().lock();
        // Clear the screen and home the cursor, then draw.
        write!(out, "\x1b[H\x1b[2J{addr}\n{}", render(&parse_exposition(&text)))?;
        out.flush()?;
        std::thread::sleep(Duration::from_secs_f64(args.interval));
        match scrape(&addr) {
            Ok(t) => text = t,
            Err(_) => {
                writeln!(out, "\nthe run at {addr} has ended")?;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_grouped_per_actor() {
        let text = r#"# TYPE tandem_actor_busy_fraction gauge
tandem_actor_busy_fraction{kind="learner",actor="learner/cpu:1",device="cpu:1"} 0.5
tandem_actor_busy_fraction{kind="rollout",actor="rollout/cpu:0/0",device="cpu:0"} 0.25
tandem_actor_queue_depth{kind="rollout",actor="rollout/cpu:0/0",device="cpu:0"} 1
tandem_actor_queue_capacity{kind="rollout",actor="rollout/cpu:0/0",device="cpu:0"} 2
tandem_actor_state{kind="rollout",actor="rollout/cpu:0/0",device="cpu:0"} 2
tandem_learner_steps 7
"#;
        let s = parse_exposition(text);
        assert_eq!(s.len(), 6);
        let r = rows(&s);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].kind.as_str(), r[0].busy, r[0].depth, r[0].capacity),
            ("rollout", Some(0.25), Some(1.0), Some(2.0))
        );
        let table = render(&s);
        assert!(table.starts_with("step 7/- "), "{table}");
        let line = table.lines().find(|l| l.starts_with("rollout")).unwrap();
        assert!(
            line.contains("blocked") && line.contains("25") && line.contains("1/2"),
            "{line}"
        );
    }

    #[test]
    fn label_values_may_hold_escapes_and_commas() {
        let s = parse_exposition(r#"x{a="p,q",b="say \"hi\""} 1.5"#);
        assert_eq!(s[0].labels["a"], "p,q");
        assert_eq!(s[0].labels["b"], "say \"hi\"");
        assert_eq!(s[0].value, 1.5);
    }
}
