//! A reward source that asks an external program: users plug in verifiers written in any
//! language (`command = ["python3", "verifier.py"]`).
//!
//! Protocol: the program is started once and kept running. For each batch, tandem writes one
//! JSON object per response to its stdin,
//! `{"prompt": TEXT, "response": TEXT, "prompt_ids": [..], "response_ids": [..]}`
//! (the response text stops before the first stop token; the ids are complete), and reads one
//! line per request from its stdout, in order: a number (`0.5`) or an object with a numeric
//! `"score"` (`{"score": 0.5}`). Its stderr is kept (the last 2 KiB) for error messages.
//!
//! Failures, each an error naming the command:
//! - it hangs: no score line within `timeout` of the previous one (or of the request) — the
//!   process is killed;
//! - it crashes: stdout closes early — the error gives the exit status and the stderr tail;
//! - it prints garbage: a line that is not a finite score — the error quotes the line, and
//!   the process is killed (its remaining output would be out of step).
//!
//! After a failure the batch is retried on a fresh process, at most `max_restarts` times over
//! the source's lifetime; past that the failure is returned (the reward actor then fails with
//! this message). A program that cannot be started at all is an error at once.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::json;

use crate::error::ActorError;
use crate::reward_source::RewardSource;
use crate::rule_reward::ResponseText;

const STDERR_TAIL: usize = 2048;

/// What to run and how patiently.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory (`None`: the current one).
    pub cwd: Option<PathBuf>,
    /// Longest wait for one score line.
    pub timeout: Duration,
    /// Fresh processes allowed after failures, over the source's lifetime.
    pub max_restarts: u32,
}

impl CommandSpec {
    fn display(&self) -> String {
        self.argv.join(" ")
    }
}

/// One running child with its pipe threads.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    stderr_done: Receiver<()>,
}

impl Running {
    fn start(spec: &CommandSpec) -> Result<Self, ActorError> {
        let (prog, args) = spec
            .argv
            .split_first()
            .ok_or_else(|| ActorError::RewardCommand("reward command is empty".into()))?;
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(d) = &spec.cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ActorError::RewardCommand(format!("cannot start reward command `{}`: {e}", spec.display())))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("tandem-reward-cmd-out".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let end = line.is_err();
                    if tx.send(line).is_err() || end {
                        break;
                    }
                }
            })
            .map_err(|e| ActorError::RewardCommand(format!("cannot start a reader thread: {e}")))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (done_tx, stderr_done) = crossbeam_channel::bounded(1);
        let t = tail.clone();
        std::thread::Builder::new()
            .name("tandem-reward-cmd-err".into())
            .spawn(move || {
                let mut buf = [0u8; 1024];
                let mut stderr = stderr;
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut q = t.lock().expect("stderr tail lock");
                    q.extend(&buf[..n]);
                    let excess = q.len().saturating_sub(STDERR_TAIL);
                    q.drain(..excess);
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| ActorError::RewardCommand(format!("cannot start a reader thread: {e}")))?;
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr: tail,
            stderr_done,
        })
    }

    fn stderr_tail(&self) -> String {
        let q = self.stderr.lock().expect("stderr tail lock");
        let bytes: Vec<u8> = q.iter().copied().collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Sends the requests and reads one score per request, or says what went wrong.
    fn exchange(&mut self, spec: &CommandSpec, requests: &[String]) -> Result<Vec<f32>, String> {
        let cmd = spec.display();
        let n = requests.len();
        // Write from a helper thread: a program that stops reading must not block us past the
        // timeout (a full pipe would).
        let mut stdin = self.stdin.take().ok_or("stdin already closed")?;
        let payload: String = requests.iter().map(|r| format!("{r}\n")).collect();
        let writer = std::thread::spawn(move || {
            let ok = stdin.write_all(payload.as_bytes()).and_then(|_| stdin.flush());
            (stdin, ok)
        });
        let mut scores = Vec::with_capacity(n);
        let mut deadline = Instant::now() + spec.timeout;
        for i in 0..n {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(wait) {
                Ok(Ok(line)) => {
                    scores.push(parse_score(&line).ok_or_else(|| {
                        format!(
                            "reward command `{cmd}` printed {line:?} for request {} of {n}; expected a number or {{\"score\": x}} per line",
                            i + 1
                        )
                    })?);
                    deadline = Instant::now() + spec.timeout;
                }
                Ok(Err(e)) => return Err(format!("reward command `{cmd}`: reading its stdout: {e}")),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "reward command `{cmd}` timed out: no score for request {} of {n} within {:.3} s; killed it",
                        i + 1,
                        spec.timeout.as_secs_f64()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit();
                    let _ = self.stderr_done.recv_timeout(Duration::from_secs(1));
                    let tail = self.stderr_tail();
                    return Err(format!(
                        "reward command `{cmd}` {status} before scoring request {} of {n}; stderr: {}",
                        i + 1,
                        if tail.is_empty() {
                            "(empty)".to_string()
                        } else {
                            format!("{tail:?}")
                        }
                    ));
                }
            }
        }
        match writer.join() {
            Ok((stdin, Ok(()))) => self.stdin = Some(stdin),
            Ok((_, Err(e))) => return Err(format!("reward command `{cmd}`: writing its stdin: {e}")),
            Err(_) => return Err(format!("reward command `{cmd}`: stdin writer panicked")),
        }
        Ok(scores)
    }

    /// "exited with exit status: N" (waiting up to a second for the process to finish).
    fn wait_exit(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return format!("exited with {s}"),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => return "closed its stdout".into(),
                Err(e) => return format!("could not be waited for ({e})"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A number, or `{"score": number}`; finite.
fn parse_score(line: &str) -> Option<f32> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let x = match &v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::Object(o) => o.get("score")?.as_f64()?,
        _ => return None,
    };
    x.is_finite().then_some(x as f32)
}

struct State {
    running: Option<Running>,
    restarts: u32,
}

/// The external-command reward source (see the module docs).
pub struct CommandReward {
    spec: CommandSpec,
    text: ResponseText,
    state: Mutex<State>,
}

impl CommandReward {
    /// Starts the program now, so a command that cannot run fails at start-up.
    pub fn new(spec: CommandSpec, text: ResponseText) -> Result<Self, ActorError> {
        let running = Running::start(&spec)?;
        Ok(Self {
            spec,
            text,
            state: Mutex::new(State {
                running: Some(running),
                restarts: 0,
            }),
        })
    }

    /// Processes started after failures so far.
    pub fn restarts(&self) -> u32 {
        self.state.lock().map(|s| s.restarts).unwrap_or(0)
    }
}

impl RewardSource for CommandReward {
    fn score(&self, prompts: &[&[u32]], responses: &[&[u32]], _device: &Device) -> Result<Vec<f32>, ActorError> {
        let requests = prompts
            .iter()
            .zip(responses)
            .map(|(p, r)| {
                Ok(json!({
                    "prompt": self.text.text(p)?,
                    "response": self.text.response(r)?,
                    "prompt_ids": p,
                    "response_ids": r,
                })
                .to_string())
            })
            .collect::<Result<Vec<_>, ActorError>>()?;
        let mut st = self
            .state
            .lock()
            .map_err(|_| ActorError::Poisoned("reward command state"))?;
        loop {
            if st.running.is_none() {
                st.running = Some(Running::start(&self.spec)?);
            }
            let out = st.running.as_mut().expect("started").exchange(&self.spec, &requests);
            match out {
                Ok(scores) => return Ok(scores),
                Err(msg) => {
                    st.running = None; // killed and reaped by Drop
                    if st.restarts >= self.spec.max_restarts {
                        // Every later batch would fail the same way: stop the run, once.
                        return Err(ActorError::Fatal(format!(
                            "{msg} (no restarts left: max_restarts = {})",
                            self.spec.max_restarts
                        )));
                    }
                    st.restarts += 1;
                    tracing::warn!(restart = st.restarts, "{msg}; restarting it");
                }
            }
        }
    }

    fn name(&self) -> &str {
        "command"
    }

    fn uses_device(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_models::TextTokenizer;

    fn text() -> ResponseText {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
          "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
          "model":{"type":"WordLevel","vocab":{"<eos>":0,"<unk>":1,"good":2,"bad":3,"movie":4},"unk_token":"<unk>"}}"#;
        ResponseText::new(
            Arc::new(TextTokenizer::from_json(json, std::path::Path::new("<test>")).unwrap()),
            [0],
        )
    }

    fn spec(script: &str, timeout_ms: u64, max_restarts: u32) -> CommandSpec {
        CommandSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            cwd: None,
            timeout: Duration::from_millis(timeout_ms),
            max_restarts,
        }
    }

    fn score(r: &CommandReward) -> Result<Vec<f32>, ActorError> {
        r.score(&[&[4], &[4], &[4]], &[&[2, 2, 0], &[3], &[2, 3]], &Device::Cpu)
    }

    /// Scores = number of times "good" occurs in the response text; alternate output forms.
    const COUNT_GOOD: &str = r#"n=0; while IFS= read -r line; do
        resp=$(printf '%s' "$line" | sed 's/.*"response":"\([^"]*\)".*/\1/')
        c=$(printf '%s\n' $resp | grep -c '^good$')
        n=$((n+1)); if [ $((n % 2)) -eq 0 ]; then echo "{\"score\": $c}"; else echo "$c"; fi
    done"#;

    #[test]
    fn a_correct_command_scores_each_request_and_stays_up() {
        let r = CommandReward::new(spec(COUNT_GOOD, 5000, 0), text()).unwrap();
        assert_eq!(score(&r).unwrap(), vec![2.0, 0.0, 1.0]);
        // The same process answers the next batch (its line counter continues).
        assert_eq!(score(&r).unwrap(), vec![2.0, 0.0, 1.0]);
        assert_eq!(r.restarts(), 0);
    }

    #[test]
    fn a_hanging_command_times_out_is_killed_and_restarted() {
        let t = Instant::now();
        let r = CommandReward::new(spec("read line; sleep 30", 300, 1), text()).unwrap();
        let e = score(&r).unwrap_err().to_string();
        assert!(
            e.contains("reward command `sh -c read line; sleep 30` timed out"),
            "{e}"
        );
        assert!(e.contains("request 1 of 3 within 0.300 s; killed it"), "{e}");
        assert_eq!(r.restarts(), 1);
        // Two tries of 0.3 s each, not 30 s.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn a_crashing_command_reports_its_exit_status_and_stderr() {
        let r = CommandReward::new(
            spec("read line; echo 0.5; echo 'bad input!' >&2; exit 3", 5000, 0),
            text(),
        )
        .unwrap();
        let e = score(&r).unwrap_err().to_string();
        assert!(
            e.contains("exited with exit status: 3 before scoring request 2 of 3"),
            "{e}"
        );
        assert!(e.contains("stderr: \"bad input!\""), "{e}");
    }

    #[test]
    fn a_command_printing_garbage_is_quoted() {
        let r = CommandReward::new(spec("while read line; do echo 'score=high'; done", 5000, 2), text()).unwrap();
        let e = score(&r).unwrap_err().to_string();
        assert!(e.contains("printed \"score=high\" for request 1 of 3"), "{e}");
        assert!(e.contains("max_restarts = 2"), "{e}");
        assert_eq!(r.restarts(), 2);
    }

    #[test]
    fn a_restart_recovers_from_one_crash() {
        let dir = std::env::temp_dir().join(format!("tandem-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("crashed");
        let _ = std::fs::remove_file(&marker);
        // Crashes the first time it runs, then answers 1 to everything.
        let script = format!(
            "if [ ! -e {m} ]; then touch {m}; exit 1; fi; while read line; do echo 1; done",
            m = marker.display()
        );
        let r = CommandReward::new(spec(&script, 5000, 1), text()).unwrap();
        assert_eq!(score(&r).unwrap(), vec![1.0, 1.0, 1.0]);
        assert_eq!(r.restarts(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn scores_parse_as_numbers_or_score_objects() {
        assert_eq!(parse_score(" 1.5 "), Some(1.5));
        assert_eq!(parse_score(r#"{"score": -2}"#), Some(-2.0));
        assert_eq!(parse_score("nan"), None);
        assert_eq!(parse_score(r#"{"reward": 1}"#), None);
        assert_eq!(parse_score("[1]"), None);
    }
}
