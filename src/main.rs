//! `tandem`: the command-line front end of the runtime.
//!
//! Each subcommand lives in its own module exposing an argument type and a `run` function;
//! adding one is a variant of [`Command`], its module, and an arm in [`Command::run`].
//!
//! Errors are reported as `error: <message with context>` on stderr, never as a panic. The exit
//! status says whose fault it was: 2 for bad input (arguments, model directories, files named on
//! the command line — the same status clap uses for usage errors), 1 for anything else.

// The allocator sets mimalloc options through its C API (`unsafe` calls with SAFETY comments).
#[allow(unsafe_code)]
mod allocator;
mod bench;
mod bench_cluster;
mod bench_overlap;
mod bench_ppo;
mod bench_staleness;
mod device;
mod error;
mod eval;
mod gen_task;
mod inspect;
mod node;
mod progress;
mod replay;
mod report;
mod rerun;
mod run;
mod sample;
mod sft;
mod top;
mod train_rm;

use std::io::{IsTerminal, Write};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Actor-based asynchronous RL runtime for language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr as text or as JSON objects; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// tracing to stderr, filtered by RUST_LOG (e.g. `RUST_LOG=tandem_runtime=debug`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start an RL run from a config file.
    Run(run::RunArgs),
    /// Live per-actor table from a run's metrics endpoint.
    Top(top::TopArgs),
    /// Inspect, verify, export and rescore a run's stored trajectories.
    Replay(replay::ReplayArgs),
    /// Look at one model's numbers: token log-probs, a generation, a reward score.
    #[command(subcommand)]
    Inspect(inspect::InspectCommand),
    /// Benchmarks: generation, the PPO loop, sync vs async overlap, the staleness ablation,
    /// weight transfer to nodes.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// A worker node: join a head and host the rollouts it places here.
    Node(node::NodeArgs),
    /// Write a self-contained HTML report of a run's learning curves and actor utilisation.
    Report(report::ReportArgs),
    /// Train a reward model from preference data (pairwise, HH-RLHF or ranked JSONL).
    TrainRm(train_rm::TrainRmArgs),
    /// Best-of-N sampling: generate N per prompt, keep the best-scored, write JSONL.
    Sample(sample::SampleArgs),
    /// Supervised fine-tuning on prompt/completion or chat JSONL; saves the model in HF layout.
    Sft(sft::SftArgs),
    /// Evaluate a model on held-out prompts: accuracy, pass@k, mean length, no-stop fraction.
    Eval(eval::EvalArgs),
    /// Write a verifiable task's data (prompts, completions, answers) as JSONL.
    #[command(subcommand)]
    GenTask(gen_task::GenTaskCommand),
}

impl Command {
    fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Run(args) => run::run(args),
            Command::Top(args) => top::run(args),
            Command::Replay(args) => replay::run(args),
            Command::Inspect(cmd) => inspect::run(cmd),
            Command::Bench(cmd) => bench::run(cmd),
            Command::Report(args) => report::run(args),
            Command::Node(args) => node::run(args),
            Command::TrainRm(args) => train_rm::run(args),
            Command::Sample(args) => sample::run(args),
            Command::Sft(args) => sft::run(args),
            Command::Eval(args) => eval::run(args),
            Command::GenTask(cmd) => gen_task::run(cmd),
        }
    }
}

/// Writes one JSON value as a line on stdout (an error, not a panic, if stdout is closed).
pub(crate) fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")?;
    out.flush()?;
    Ok(())
}

/// Panics inside actors are caught and handled by their supervisor (restart, or a clear error);
/// they are logged as one line, with the default report and backtrace only under RUST_BACKTRACE.
fn install_panic_logger() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            return default(info);
        }
        let location = info.location().map(|l| l.to_string()).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        tracing::error!(%thread, %location, "panic: {}", info.payload_as_str().unwrap_or("(non-string payload)"));
    }));
}

/// The tokio runtime every command runs its actors and I/O on: one worker thread named
/// `name`. Compute never runs here; it runs on device executors (`docs/semantics.md`).
///
/// One worker, because actors hand messages to each other far more often than any of them
/// computes: a message to another actor then runs on the thread that is already awake, after
/// the sender yields. With two workers, tokio woke the parked one to take it, and while every
/// core ran compute that thread waited for the OS scheduler: in `bench overlap`'s async mode
/// the learner's request for its next batch reached the replay actor about 2 ms late in a
/// third of the steps, with the batch ready. With one worker the learner waits 0.05 ms a step
/// at the median, and the async step is 1.02× the learner's busy time instead of 1.05–1.14×.
fn control_runtime(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name(name)
        .build()
        .context("cannot start the async runtime")
}

fn main() -> ExitCode {
    allocator::keep_freed_memory();
    // Before any thread starts: every compute thread belongs to a device executor.
    tandem_actors::device::init_compute_threads();
    if std::env::var_os("TANDEM_REFERENCE_KERNELS").is_some_and(|v| v == "1") {
        tandem_models::kernels::set_reference_only(true);
    }
    let cli = Cli::parse();
    init_logging(cli.log_format);
    install_panic_logger();
    match cli.command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error::chain_text(&e));
            ExitCode::from(error::exit_code(&e))
        }
    }
}
