//! What every stage binary's `main` shares: the arguments, logging, signal handling, and the
//! last resort that turns any error or panic into one line on stderr and an exit code.

use std::path::PathBuf;

use crate::exit::StageError;

#[derive(Debug, Clone, clap::Parser)]
#[command(version)]
pub struct StageArgs {
    /// The stage's YAML config (docs/stages.md lists every key and its default). Relative paths
    /// in it are relative to the file's folder.
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder: checkpoint/, state/, metrics.jsonl, samples.jsonl, summary.json. It must
    /// be new, empty, or a temper stage folder (which is resumed from its state/); a folder of
    /// other files is refused.
    #[arg(long)]
    pub out: PathBuf,
    /// Check the config and its inputs, print the resolved config, and exit without training
    /// or writing anything.
    #[arg(long)]
    pub validate: bool,
    /// With --validate: a path an upstream stage will produce. Its existence is not checked,
    /// and checks that need its content are skipped. Repeatable.
    #[arg(long, value_name = "PATH")]
    pub pending: Vec<PathBuf>,
}

/// The `main` of a stage binary: parses the arguments (`name` and `about` are its `--help`),
/// then [`main_with`].
pub fn stage_main(
    name: &'static str,
    about: &'static str,
    run: impl FnOnce(&StageArgs) -> Result<(), StageError>,
) -> ! {
    use clap::{CommandFactory, FromArgMatches};
    let matches = StageArgs::command().name(name).about(about).get_matches();
    let args = StageArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    main_with(name, || run(&args))
}

/// How `--validate` ends its output when some input is pending: this prefix, then the fields
/// whose content checks wait for the run (`temper validate` lists them).
pub const PENDING_LINE: &str = "pending: ";

/// The start every stage shares: read the config, run its range and input checks. None when
/// the stage should stop here: an input is pending (an upstream stage will write it), so the
/// checks that need its content wait for the run. The stage then loads what it needs and,
/// under `--validate`, prints the resolved config and stops.
pub fn checked_config<T: serde::de::DeserializeOwned + serde::Serialize>(
    args: &StageArgs,
    kind: crate::StageKind,
    check: impl FnOnce(&crate::ConfigFile<T>, &mut crate::Inputs) -> Result<(), StageError>,
) -> Result<Option<crate::ConfigFile<T>>, StageError> {
    let cfg = crate::ConfigFile::<T>::load(&args.config, kind)?;
    let mut inputs = crate::Inputs::new(&args.pending);
    check(&cfg, &mut inputs)?;
    crate::folder::check(&args.out)?;
    if inputs.any_pending() {
        cfg.print_resolved()?;
        println!("{PENDING_LINE}{}", inputs.pending_fields().join(", "));
        return Ok(None);
    }
    Ok(Some(cfg))
}

/// Runs a stage's main: installs logging and signal handlers, runs `run`, and turns an error
/// into one line `<name>: error: …` with its exit code; a panic (a bug, never user input)
/// becomes one line with exit 1 instead of a backtrace.
pub fn main_with(name: &str, run: impl FnOnce() -> Result<(), StageError>) -> ! {
    init_tracing();
    crate::signals::install();
    install_panic_hook(name);
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("{name}: error: {}", one_line(&format!("{:#}", e.error)));
            e.code
        }
        Err(_) => crate::EXIT_FAILED, // the hook has printed the message
    };
    std::process::exit(code)
}

/// Newlines flattened, so a failure is exactly one line.
pub fn one_line(msg: &str) -> String {
    msg.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A closed stdout (`temper status | head -1`) ends the process quietly with 0; any other
/// panic prints one line naming where it happened.
pub fn install_panic_hook(name: &str) {
    let name = name.to_string();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        if msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "{name}: error: internal error{place}: {}; please report it",
            one_line(msg)
        );
    }));
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TEMPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// How to start a stage over, for messages about a state that cannot be resumed: the exact
/// `temper run` command when the orchestrator started this stage (it sets TEMPER_PIPELINE and
/// TEMPER_STAGE), else the folder to remove by hand.
pub fn fresh_hint(state_dir: &std::path::Path) -> String {
    match (
        std::env::var("TEMPER_PIPELINE"),
        std::env::var("TEMPER_STAGE"),
    ) {
        (Ok(file), Ok(stage)) => {
            format!("start the stage over with `temper run {file} --stage {stage} --fresh`")
        }
        _ => format!("start over by removing {} by hand", state_dir.display()),
    }
}
