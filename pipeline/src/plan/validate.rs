//! Checking stages with their own parsers before anything runs: each stage binary's
//! `--validate` on its resolved config, in parallel. Paths an upstream stage will produce are
//! passed as `--pending`, so a typo in the last stage of a never-run pipeline is found at once,
//! and every error is reported at the line of the pipeline file where the key was written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use temper_stage::yaml_lines::{exact_line, line_of};

use crate::plan::resolve::{resolve_all, Resolved};
use crate::plan::{decide, Decision};
use crate::run::lock::Lock;
use crate::spec::Pipeline;

/// One stage's problem, placed in the pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageProblem {
    pub file: PathBuf,
    pub stage: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for StageProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ": stage `{}`: {}", self.stage, self.message)
    }
}

/// The line of `stage`'s parameter `field` (dotted) in the pipeline file: where its `with:`
/// declares it, else where `defaults:` does, else its nearest declared ancestor in the stage.
pub fn pipeline_line(text: &str, stage: &str, field: Option<&str>) -> Option<usize> {
    let parts: Vec<&str> = field.map(|f| f.split('.').collect()).unwrap_or_default();
    let with: Vec<&str> = [&["stages", stage, "with"][..], &parts].concat();
    let defaults: Vec<&str> = [&["defaults"][..], &parts].concat();
    if parts.is_empty() {
        return line_of(text, &["stages", stage]);
    }
    exact_line(text, &with)
        .or_else(|| exact_line(text, &defaults))
        .or_else(|| line_of(text, &with))
}

/// Turns a stage binary's one-line error about `config` into a problem at the pipeline line.
fn place(p: &Pipeline, text: &str, stage: &str, config: &Path, stderr: &str) -> StageProblem {
    // A branch of a sweep is written in the file under its group's name.
    let group = p.stage(stage).map_or(stage, |s| s.group.as_str());
    let line = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("failed without a message");
    let line = line.split_once(": error: ").map_or(line, |(_, m)| m);
    let cfg = config.display().to_string();
    let (field, message) = match line.strip_prefix(&cfg) {
        Some(rest) => {
            // `:LINE: field `a.b`: message`, `: field ...` or `: message`
            let rest = rest.trim_start_matches(|c: char| c == ':' || c.is_ascii_digit());
            let rest = rest.trim_start();
            match rest
                .strip_prefix("field `")
                .and_then(|r| r.split_once("`: "))
            {
                Some((f, m)) => (Some(f.to_string()), format!("with.{f}: {m}")),
                None => (None, rest.to_string()),
            }
        }
        None => (None, line.replace(&cfg, "its config")),
    };
    StageProblem {
        file: p.file.clone(),
        stage: stage.into(),
        line: pipeline_line(text, group, field.as_deref()),
        message,
    }
}

/// What the stages' own checks found.
#[derive(Debug, Default)]
pub struct Checked {
    pub problems: Vec<StageProblem>,
    /// Stage → its fields whose paths an upstream stage has yet to write: the checks that read
    /// them ([`temper_stage::StageKind::content_checks`]) run when the stage starts.
    pub pending: BTreeMap<String, Vec<String>>,
}

/// Runs `--validate` of each of `names`; `rebuilt` are stages that will run before them, whose
/// outputs count as pending even where old ones exist. Returns every problem found.
pub fn validate_stages(
    p: &Pipeline,
    resolved: &BTreeMap<String, Resolved>,
    names: &[String],
    rebuilt: &BTreeSet<String>,
) -> anyhow::Result<Checked> {
    let text = std::fs::read_to_string(&p.file).unwrap_or_default();
    let scratch = std::env::temp_dir().join(format!("temper-validate-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut jobs = Vec::new();
    for name in names {
        let r = &resolved[name];
        let cfg = scratch.join(format!("{name}.yaml"));
        std::fs::write(&cfg, serde_yaml::to_string(&r.config_abs)?)?;
        let mut cmd = Command::new(&r.binary);
        cmd.arg("--validate")
            .arg("--config")
            .arg(&cfg)
            .arg("--out")
            .arg(p.stage_attempt(name))
            .env("TEMPER_LOG", "error");
        // Checked as one process, whatever launcher's environment `temper run` is in.
        for var in crate::run::launch::RANK_VARS {
            cmd.env_remove(var);
        }
        for (parent, paths) in &r.upstream {
            for path in paths {
                if rebuilt.contains(parent) || !path.exists() {
                    cmd.arg("--pending").arg(path);
                }
            }
        }
        jobs.push((name.clone(), cfg, cmd));
    }
    // Two at a time: each loads libtorch, and this machine class has two cores.
    let mut checked = Checked::default();
    for chunk in jobs.chunks_mut(2) {
        let outputs: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter_mut()
                .map(|(_, _, cmd)| scope.spawn(move || cmd.output()))
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        for ((name, cfg, _), out) in chunk.iter().zip(outputs) {
            let out = out
                .map_err(|_| anyhow::anyhow!("validating {name} panicked"))?
                .map_err(|e| anyhow::anyhow!("stage `{name}`: cannot start its binary: {e}"))?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                checked.problems.push(place(p, &text, name, cfg, &stderr));
                continue;
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            if let Some(fields) = stdout
                .lines()
                .find_map(|l| l.strip_prefix(temper_stage::cli::PENDING_LINE))
            {
                let fields = fields.split(", ").map(str::to_string).collect();
                checked.pending.insert(name.clone(), fields);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(checked)
}

/// `temper validate`: every stage checked with its own parser. Upstream outputs that do not
/// exist yet, or whose stages are stale, are pending. Prints the verdict; returns the exit
/// code.
pub fn validate_all(p: &Pipeline) -> anyhow::Result<i32> {
    let lock = Lock::load(&p.workdir)?;
    let mut cache = lock.file_hashes.clone();
    let resolved = resolve_all(p, &mut cache)?;
    let names: Vec<String> = p.topo_order().iter().map(|s| s.name.clone()).collect();
    let stale: BTreeSet<String> = names
        .iter()
        .filter(|n| decide(&resolved[*n], p, &lock, &mut cache).0 != Decision::Skip)
        .cloned()
        .collect();
    let checked = validate_stages(p, &resolved, &names, &stale)?;
    if checked.problems.is_empty() {
        println!("{}: valid ({} stages)", p.file.display(), p.stages.len());
        if !checked.pending.is_empty() {
            println!(
                "checked when the stage starts (it reads what an upstream stage has yet to write):"
            );
            for st in p.topo_order() {
                if let Some(fields) = checked.pending.get(&st.name) {
                    println!(
                        "  {}: {} — {}",
                        st.name,
                        fields.join(", "),
                        st.uses.content_checks()
                    );
                }
            }
        }
        return Ok(0);
    }
    eprintln!("temper: error: {} problem(s):", checked.problems.len());
    for pr in checked.problems {
        eprintln!("  {pr}");
    }
    Ok(crate::run::EXIT_INVALID)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIPE: &str = "\
name: x
workdir: w
defaults:
  device: cpu
stages:
  sft:
    uses: sft
    with:
      steps: 3
      optim: {lr: 1e-3}
  ppo:
    uses: ppo
    with:
      kl:
        coef: 0.1
";

    #[test]
    fn fields_map_to_the_line_that_wrote_them() {
        assert_eq!(pipeline_line(PIPE, "sft", Some("steps")), Some(9));
        assert_eq!(pipeline_line(PIPE, "sft", Some("optim.lr")), Some(10));
        assert_eq!(pipeline_line(PIPE, "ppo", Some("kl.coef")), Some(15));
        assert_eq!(
            pipeline_line(PIPE, "ppo", Some("device")),
            Some(4),
            "from defaults"
        );
        assert_eq!(
            pipeline_line(PIPE, "ppo", Some("kl.nope")),
            Some(14),
            "nearest ancestor"
        );
        assert_eq!(pipeline_line(PIPE, "sft", None), Some(6));
    }
}
