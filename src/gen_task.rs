//! `tandem gen-task addition --digits N --count N --seed S --out FILE [--reverse] [--chat]
//! [--exclude HELD_OUT.jsonl]`:
//! writes a verifiable task's data as JSONL (see `tandem_runtime::tasks`): records with a
//! `prompt` (or chat `messages`), the `completion` SFT trains on, and the `answer` that `tandem
//! eval` and the exact-match reward compare responses with. Seeded: the same arguments give the
//! same file. The last line on stdout is a JSON summary.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;
use tandem_runtime::tasks::{task_prompts, write_addition, Addition};

#[derive(Debug, Subcommand)]
pub enum GenTaskCommand {
    /// Multi-digit addition: `a+b=` -> the sum.
    Addition(AdditionArgs),
}

#[derive(Debug, Args)]
pub struct AdditionArgs {
    /// Digits of each operand (1 to 18).
    #[arg(long, default_value_t = 3)]
    digits: u32,
    /// Records to write.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the sum least-significant digit first.
    #[arg(long)]
    reverse: bool,
    /// `{"messages": [...]}` records instead of prompt/completion.
    #[arg(long)]
    chat: bool,
    /// Leave out the problems whose prompt is in this task file (e.g. the held-out set), so
    /// that evaluation prompts are never trained on. Fewer than --count records are then written.
    #[arg(long)]
    exclude: Option<PathBuf>,
    /// Output JSONL file.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(cmd: GenTaskCommand) -> anyhow::Result<()> {
    match cmd {
        GenTaskCommand::Addition(a) => {
            let task = Addition {
                digits: a.digits,
                reverse: a.reverse,
                chat: a.chat,
            };
            let exclude = match &a.exclude {
                Some(p) => task_prompts(p)?,
                None => Default::default(),
            };
            let n = write_addition(task, a.count, a.seed, &exclude, &a.out)?;
            crate::print_json(
                &json!({"task": "addition", "digits": a.digits, "reverse": a.reverse, "records": n, "out": a.out}),
            )
        }
    }
}
