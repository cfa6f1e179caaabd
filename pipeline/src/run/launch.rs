//! How a stage's processes start: one process, or the ranks of a data-parallel stage
//! (`resources: {nproc: N}`), started by temper itself with the variables torchrun sets, by
//! `torchrun`, or by `srun` inside a Slurm allocation. Every rank is in one process group, so
//! a signal reaches all of them, and when one rank fails the others are stopped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use temper_stage::{signals, StageKind};

fn one() -> usize {
    1
}

/// The variables that place a process among ranks. `temper run` may itself run inside a
/// launcher's environment (a Slurm batch script has SLURM_NTASKS of the whole job), so the
/// processes it starts get them only from temper (or from srun), never by inheritance.
pub const RANK_VARS: [&str; 7] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
];

/// A stage's `resources:` block. Not part of the stage's cache key: the same global batch
/// gives the same result (up to the order of float sums) on any number of ranks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Ranks per node (data parallel; `batch_size` is per rank).
    #[serde(default = "one")]
    pub nproc: usize,
    /// Nodes: above one only through Slurm (`temper export slurm`) or torchrun on each node.
    #[serde(default = "one")]
    pub nnodes: usize,
    #[serde(default)]
    pub launcher: Launcher,
}

/// Who starts the ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launcher {
    /// `srun` inside a Slurm allocation (SLURM_JOB_ID set), temper itself otherwise.
    #[default]
    Auto,
    /// temper starts the ranks with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
    Temper,
    /// `torchrun --no-python` (found on PATH, or TEMPER_TORCHRUN).
    Torchrun,
    /// `srun` (inside an allocation: sbatch or salloc).
    Srun,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            nproc: 1,
            nnodes: 1,
            launcher: Launcher::Auto,
        }
    }
}

impl Resources {
    pub fn world(&self) -> usize {
        self.nproc * self.nnodes
    }

    /// Problems with the block for a stage of `kind`, as messages.
    pub fn problems(&self, kind: StageKind) -> Vec<String> {
        let mut out = Vec::new();
        if self.nproc == 0 || self.nnodes == 0 {
            out.push("resources: nproc and nnodes must be at least 1".to_string());
        }
        if self.world() > 1 && !kind.data_parallel() {
            out.push(format!(
                "resources: {} ranks, but temper-{} does not train data-parallel (the training \
                 stages do); remove `resources`",
                self.world(),
                kind.name()
            ));
        }
        out
    }

    /// The launcher to use here and now.
    fn launcher(&self) -> Launcher {
        match self.launcher {
            Launcher::Auto if std::env::var_os("SLURM_JOB_ID").is_some() => Launcher::Srun,
            Launcher::Auto => Launcher::Temper,
            l => l,
        }
    }

    /// Why `temper run` cannot start these ranks on this machine, if it cannot.
    pub fn unrunnable_here(&self) -> Option<String> {
        (self.nnodes > 1 && self.launcher() == Launcher::Temper).then(|| {
            format!(
                "resources.nnodes {}: `temper run` starts ranks on this machine only; run the \
                 pipeline through Slurm (`temper export slurm`) or launch with torchrun on each node",
                self.nnodes
            )
        })
    }
}

/// What the processes of one stage run: its binary and arguments, environment and log.
pub struct StageCommand<'a> {
    pub binary: &'a Path,
    pub args: Vec<std::ffi::OsString>,
    pub env: Vec<(&'static str, std::ffi::OsString)>,
    /// Rank 0's output (the stage log); rank k's goes beside it as `<log>.rank<k>`.
    pub log: &'a Path,
}

/// The running processes of one stage.
pub struct Ranks {
    children: Vec<Child>,
    /// Their process group (rank 0's pid).
    pub pgid: i32,
    /// When the first rank failed (the others were asked to stop then).
    failed_at: Option<(Instant, ExitStatus)>,
}

impl Ranks {
    /// Starts the stage's processes, each in rank 0's process group, each dying with temper.
    pub fn spawn(c: &StageCommand, resources: &Resources) -> anyhow::Result<Self> {
        let parent_pid = std::process::id() as libc::pid_t;
        let base = |program: &Path, log: &Path, group: i32| -> anyhow::Result<Command> {
            let log = File::options().create(true).append(true).open(log)?;
            let mut cmd = Command::new(program);
            for var in RANK_VARS {
                cmd.env_remove(var);
            }
            cmd.envs(c.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .stdin(Stdio::null())
                .process_group(group);
            // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid, _exit).
            unsafe {
                cmd.pre_exec(move || signals::die_with_parent(parent_pid));
            }
            Ok(cmd)
        };
        let start = |mut cmd: Command, what: &Path| {
            cmd.spawn()
                .with_context(|| format!("starting {}", what.display()))
        };
        let world = resources.world();
        let mut children = Vec::new();
        match resources.launcher() {
            _ if world == 1 => {
                let mut cmd = base(c.binary, c.log, 0)?;
                cmd.args(&c.args);
                children.push(start(cmd, c.binary)?);
            }
            Launcher::Temper | Launcher::Auto => {
                let port = free_port()?;
                // As torchrun: the cores shared out, unless the user chose.
                let threads = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| {
                    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                    (cores / world).max(1).to_string()
                });
                for rank in 0..world {
                    let log = if rank == 0 {
                        c.log.to_path_buf()
                    } else {
                        c.log.with_extension(format!("rank{rank}.log"))
                    };
                    let group = children.first().map_or(0, |c: &Child| c.id() as i32);
                    let mut cmd = base(c.binary, &log, group)?;
                    cmd.args(&c.args)
                        .env("RANK", rank.to_string())
                        .env("LOCAL_RANK", rank.to_string())
                        .env("WORLD_SIZE", world.to_string())
                        .env("LOCAL_WORLD_SIZE", world.to_string())
                        .env("MASTER_ADDR", "127.0.0.1")
                        .env("MASTER_PORT", port.to_string())
                        .env("OMP_NUM_THREADS", &threads);
                    children.push(start(cmd, c.binary)?);
                }
            }
            Launcher::Torchrun => {
                let torchrun = std::env::var_os("TEMPER_TORCHRUN").unwrap_or("torchrun".into());
                let mut cmd = base(Path::new(&torchrun), c.log, 0)?;
                cmd.args(["--no-python", "--nnodes", &resources.nnodes.to_string()])
                    .args(["--nproc-per-node", &resources.nproc.to_string()]);
                if resources.nnodes == 1 {
                    cmd.args(["--master-port", &free_port()?.to_string()]);
                } else {
                    // Multi-node: every node's torchrun meets at MASTER_ADDR:MASTER_PORT.
                    cmd.args(["--rdzv-backend", "c10d", "--rdzv-endpoint"])
                        .arg(format!(
                            "{}:{}",
                            std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into()),
                            std::env::var("MASTER_PORT").unwrap_or_else(|_| "29500".into())
                        ));
                }
                cmd.arg(c.binary).args(&c.args);
                children.push(start(cmd, Path::new(&torchrun))?);
            }
            Launcher::Srun => {
                // Each task finds its rank in SLURM_PROCID; MASTER_ADDR/PORT come from the
                // batch script (`temper export slurm` writes them).
                let mut cmd = base(Path::new("srun"), c.log, 0)?;
                cmd.arg(format!("--nodes={}", resources.nnodes))
                    .arg(format!("--ntasks={world}"))
                    .arg(format!("--ntasks-per-node={}", resources.nproc))
                    .arg("--kill-on-bad-exit=1")
                    .arg(c.binary)
                    .args(&c.args);
                children.push(start(cmd, Path::new("srun"))?);
            }
        }
        let pgid = children[0].id() as i32;
        signals::register_group(pgid);
        Ok(Self {
            children,
            pgid,
            failed_at: None,
        })
    }

    /// None while any rank runs; once all have exited, the first failure's status, else
    /// rank 0's. A failed rank makes the others be asked to stop (SIGTERM), and killed after
    /// TEMPER_STOP_GRACE_S seconds if they have not.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let mut statuses = Vec::new();
        for c in &mut self.children {
            statuses.push(c.try_wait()?);
        }
        if self.failed_at.is_none() {
            if let Some(bad) = statuses.iter().flatten().find(|s| !s.success()) {
                self.failed_at = Some((Instant::now(), *bad));
                if statuses.iter().any(Option::is_none) {
                    signals::signal_group(self.pgid, libc::SIGTERM);
                }
            }
        }
        if statuses.iter().any(Option::is_none) {
            if let Some((at, _)) = self.failed_at {
                if at.elapsed() > grace() {
                    signals::signal_group(self.pgid, libc::SIGKILL);
                }
            }
            return Ok(None);
        }
        signals::unregister_group(self.pgid);
        Ok(Some(self.failed_at.map_or(
            statuses[0].expect("all exited"),
            |(_, status)| status,
        )))
    }

    /// Whether every rank has exited.
    pub fn exited(&mut self) -> bool {
        self.children
            .iter_mut()
            .all(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Kills what is left (SIGKILL to the group) and reaps every rank.
    pub fn kill(&mut self) {
        if !self.exited() {
            signals::signal_group(self.pgid, libc::SIGKILL);
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        signals::unregister_group(self.pgid);
    }
}

/// How long stopping stages get before they are killed: TEMPER_STOP_GRACE_S, default 30.
pub fn grace() -> Duration {
    Duration::from_secs(
        std::env::var("TEMPER_STOP_GRACE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    )
}

/// A port nothing listens on now, for the ranks' rendezvous.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_checked_against_the_stage_kind() {
        let r: Resources = serde_yaml::from_str("{nproc: 2}").unwrap();
        assert_eq!(r.world(), 2);
        assert!(r.problems(StageKind::Sft).is_empty());
        assert!(r.problems(StageKind::Ppo).is_empty());
        let p = r.problems(StageKind::Eval);
        assert!(
            p[0].contains("temper-eval does not train data-parallel"),
            "{p:?}"
        );
        let r: Resources = serde_yaml::from_str("{nproc: 0}").unwrap();
        assert!(r.problems(StageKind::Sft)[0].contains("at least 1"));
        assert!(serde_yaml::from_str::<Resources>("{gpus: 2}").is_err());
        let r: Resources = serde_yaml::from_str("{nproc: 2, nnodes: 2, launcher: temper}").unwrap();
        assert!(r.unrunnable_here().unwrap().contains("temper export slurm"));
        let r: Resources = serde_yaml::from_str("{nproc: 2, nnodes: 2, launcher: srun}").unwrap();
        assert!(r.unrunnable_here().is_none());
    }
}
