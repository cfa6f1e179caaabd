//! `temper export slurm`: the pipeline as Slurm batch scripts, one per stage, and a
//! `submit.sh` that submits them in dependency order, each with `--dependency=afterok` on the
//! one before (a chain: one `temper run` at a time may use a workdir). Each script runs
//! `temper run FILE --only NAME` inside its allocation, so caching, resuming and the lock
//! work as on one machine; a stage with `resources: {nproc, nnodes}` gets that many tasks and
//! temper starts its ranks with `srun` (they find their rank in SLURM_PROCID), meeting at the
//! allocation's first node.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::spec::Pipeline;

/// What the scripts run: temper's own path, the file, and the options given to `export`.
pub struct Invocation<'a> {
    pub temper: PathBuf,
    pub workdir: Option<&'a Path>,
    pub overrides: &'a [String],
    /// Extra `#SBATCH` options for every script (`--partition=gpu`, `--time=2:00:00`).
    pub sbatch: &'a [String],
}

/// Writes the scripts into `out` (default `<workdir>/slurm`); returns the folder.
pub fn export(p: &Pipeline, how: &Invocation, out: Option<&Path>) -> anyhow::Result<PathBuf> {
    let out = out.map_or_else(|| p.workdir.join("slurm"), Path::to_path_buf);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let order = p.topo_order();
    let width = order.len().to_string().len();
    let mut scripts = Vec::new();
    for (i, st) in order.iter().enumerate() {
        let file = format!("{:0width$}-{}.sbatch", i + 1, file_name(&st.name));
        write_script(&out.join(&file), &script(p, how, &st.name, &out))?;
        scripts.push(file);
    }
    write_script(&out.join("submit.sh"), &submit(p, &scripts))?;
    Ok(out)
}

/// A name fit for a file and a job: `reward@seed=1` → `reward-seed-1`.
fn file_name(stage: &str) -> String {
    stage
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A word for bash in single quotes.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn script(p: &Pipeline, how: &Invocation, name: &str, out: &Path) -> String {
    let st = p.stage(name).expect("stage");
    let r = &st.resources;
    let mut s = String::from("#!/usr/bin/env bash\n");
    let _ = writeln!(
        s,
        "#SBATCH --job-name={}-{}",
        file_name(&p.name),
        file_name(name)
    );
    let _ = writeln!(s, "#SBATCH --nodes={}", r.nnodes);
    let _ = writeln!(s, "#SBATCH --ntasks-per-node={}", r.nproc);
    // Slurm opens the output file before the job starts, so its folder must exist by then:
    // submit.sh makes it (the workdir is temper's to create).
    let _ = writeln!(s, "#SBATCH --output={}/logs/%x-%j.out", out.display());
    for extra in how.sbatch {
        let _ = writeln!(s, "#SBATCH {extra}");
    }
    let _ = writeln!(
        s,
        "# Stage `{name}` (uses: {}), {} rank(s); temper skips it if it is up to date.",
        st.uses.name(),
        r.world()
    );
    s.push_str("set -euo pipefail\n");
    if r.world() > 1 {
        s.push_str(
            "# The ranks meet at the allocation's first node; the port is picked from the job id.\n\
             MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\n\
             export MASTER_ADDR\n\
             export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}\n",
        );
    }
    // Jobs start in the scripts' folder (submit.sh submits from there): absolute paths only.
    let file = std::path::absolute(&p.file).unwrap_or_else(|_| p.file.clone());
    let mut cmd = vec![
        quote(&how.temper.to_string_lossy()),
        "run".into(),
        quote(&file.to_string_lossy()),
        "--only".into(),
        quote(name),
    ];
    if how.workdir.is_some() {
        cmd.extend(["--workdir".into(), quote(&p.workdir.to_string_lossy())]);
    }
    for o in how.overrides {
        cmd.extend(["-o".into(), quote(o)]);
    }
    let _ = writeln!(s, "exec {}", cmd.join(" "));
    s
}

fn submit(p: &Pipeline, scripts: &[String]) -> String {
    let mut s = String::from("#!/usr/bin/env bash\n");
    let _ = writeln!(
        s,
        "# Submits pipeline `{}` to Slurm: each stage's job starts once the one before it\n\
         # succeeded (afterok). Prints each job id.",
        p.name
    );
    s.push_str(
        "set -euo pipefail\ncd \"$(dirname \"${BASH_SOURCE[0]}\")\"\nmkdir -p logs\nprev=\"\"\n",
    );
    s.push_str("for script in");
    for f in scripts {
        let _ = write!(s, " \\\n  {}", quote(f));
    }
    s.push_str(
        "; do\n  id=$(sbatch --parsable ${prev:+--dependency=afterok:$prev} \"$script\")\n  \
         id=${id%%;*}\n  echo \"$script: job $id\"\n  prev=$id\ndone\n",
    );
    s
}

fn write_script(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    temper_stage::atomic::write_atomic(path, text.as_bytes())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_quotes_survive_bash() {
        assert_eq!(file_name("reward@seed=1"), "reward-seed-1");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
