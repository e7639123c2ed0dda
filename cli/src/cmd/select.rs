//! `gantry select`: ranked model recommendations for a need and some GPUs.

use gantry_core::catalog::Catalog;
use gantry_core::hardware::parse_gpus;
use gantry_core::select::{Latency, Need, Selection, Task, select_measured};
use gantry_core::units::{format_bytes, format_params, format_tokens};

use crate::cmd::table::Table;
use crate::error::CliError;

pub const EXAMPLES: &str = "\
Examples:
  gantry select --task chat --latency realtime --gpus 1x24GiB
  gantry select --task reasoning --latency interactive --gpus 8x80GiB
  gantry select --task summarization --latency batch --min-context 128K --gpus 2x48GiB --no-gated
  gantry select --task code-completion --latency interactive --gpus 1x16GiB --max-params 8B --json";

/// How many candidates are shown without `--all`.
const SHOWN: usize = 10;

/// Arguments of `gantry select`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What the model is for: chat, summarization, question-answering, code-completion, reasoning
    #[arg(long, env = "GANTRY_TASK")]
    task: String,
    /// How fast answers must come: realtime, interactive or batch
    #[arg(long, env = "GANTRY_LATENCY")]
    latency: String,
    /// Context the model must handle (8192, 32K, 128K); memory is estimated at it [default: 8K]
    #[arg(long, env = "GANTRY_MIN_CONTEXT", value_parser = crate::process::parse_tokens_arg)]
    min_context: Option<u64>,
    /// GPUs available: COUNTxSIZE groups such as 1x24GiB or 2x80GiB,4x16GiB [default: no memory check]
    #[arg(long, env = "GANTRY_GPUS")]
    gpus: Option<String>,
    /// Leave out gated models (those whose terms must be accepted on the Hub)
    #[arg(long)]
    no_gated: bool,
    /// Leave out models larger than this (8B, 500M)
    #[arg(long, value_parser = crate::process::parse_params_arg)]
    max_params: Option<u64>,
    /// Show every candidate, not just the top 10
    #[arg(long)]
    all: bool,
    /// Print JSON (the schema is in the README)
    #[arg(long)]
    json: bool,
}

/// Runs `gantry select`.
pub fn run(args: Args) -> Result<(), CliError> {
    let need = Need {
        task: Task::parse(&args.task)?,
        latency: Latency::parse(&args.latency)?,
        min_context: args.min_context,
        no_gated: args.no_gated,
        max_params: args.max_params,
    };
    let gpus = args.gpus.as_deref().map(parse_gpus).transpose()?.unwrap_or_default();
    // Models measured on this machine (`gantry bench`) are ranked by their measured speed.
    let measured = crate::cmd::measurements::load(&crate::cmd::measurements::path())?;
    let here = if measured.is_empty() { Vec::new() } else { crate::cmd::measurements::here() };
    let refs: Vec<&gantry_core::measured::Measurement> = measured.iter().collect();
    let selection = select_measured(&need, &gpus, &Catalog::builtin()?, &refs, &here)?;
    if args.json {
        #[derive(serde::Serialize)]
        struct Versioned<'a> {
            schema_version: u32,
            #[serde(flatten)]
            selection: &'a Selection,
        }
        println!("{}", serde_json::to_string_pretty(&Versioned { schema_version: 1, selection: &selection })?);
        return Ok(());
    }
    print!("{}", render(&selection, args.all));
    Ok(())
}

fn render(s: &Selection, all: bool) -> String {
    let n = &s.need;
    let ctx = n.min_context.map_or_else(|| "8K (default)".to_string(), format_tokens);
    let mut out = format!(
        "{} {} on {}, context {}{}{}\n\n",
        n.latency.as_str(),
        n.task.as_str(),
        s.hardware,
        ctx,
        if n.no_gated { ", no gated models" } else { "" },
        n.max_params.map(|m| format!(", at most {}", format_params(m))).unwrap_or_default(),
    );
    if s.candidates.is_empty() {
        out.push_str("No model in the catalog fits this need; the reasons are below.\n");
    }
    let shown = if all { s.candidates.len() } else { SHOWN.min(s.candidates.len()) };
    let mut t =
        Table::new(&["RANK", "SCORE", "MODEL", "PARAMS", "CONTEXT", "DTYPE", "MEMORY", "GPUS", "GATED", "SPEED"]);
    for (i, c) in s.candidates.iter().take(shown).enumerate() {
        t.row(vec![
            (i + 1).to_string(),
            c.score.to_string(),
            c.id.clone(),
            format_params(c.parameters),
            format_tokens(c.context),
            c.dtype.clone(),
            format_bytes(c.memory_bytes),
            if c.gpus_used == 0 { "-".into() } else { c.gpus_used.to_string() },
            if c.gated { "yes".into() } else { "no".into() },
            match c.measured_tokens_per_sec {
                Some(r) => format!("{r:.0} tok/s ({})", c.speed_source),
                None => "estimated".into(),
            },
        ]);
    }
    if shown > 0 {
        out.push_str(&t.render(0));
        out.push_str("\nWhy:\n");
        for (i, c) in s.candidates.iter().take(shown).enumerate() {
            out.push_str(&format!("  {}. {}: {}\n", i + 1, c.id, c.reasons.join("; ")));
        }
    }
    if shown < s.candidates.len() {
        out.push_str(&format!("  … and {} more candidates (--all shows them)\n", s.candidates.len() - shown));
    }
    if !s.rejected.is_empty() {
        out.push_str(&format!("\nNot suitable ({}):\n", s.rejected.len()));
        for r in &s.rejected {
            out.push_str(&format!("  {}: {}\n", r.id, r.reasons.join("; ")));
        }
    }
    out
}
