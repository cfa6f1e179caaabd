//! A reward computed by the user's own program, in any language: started once, fed one JSON
//! object per line on stdin (`{"prompt", "reply", …the example's fields}`), answering one number
//! per line on stdout. A program that exits, hangs past its timeout or answers something that
//! is not a number stops the stage with one line naming the command and what it said.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Result, RewardError};
use crate::functions::Scored;

pub struct CommandReward {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
    timeout: Duration,
}

impl CommandReward {
    pub fn start(command: &[String], timeout_s: f64) -> Result<Self> {
        let name = command.join(" ");
        let fail = |msg: String| RewardError::Invalid(format!("reward command `{name}`: {msg}"));
        let (program, args) = command
            .split_first()
            .ok_or_else(|| fail("is empty: give the program and its arguments".into()))?;
        if !(timeout_s.is_finite() && timeout_s > 0.0) {
            return Err(fail(format!("timeout_s must be positive, got {timeout_s}")));
        }
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| fail(format!("cannot start: {e}")))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = channel();
        // A reader thread, so a program that hangs is noticed after the timeout.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name,
            child,
            stdin,
            lines: rx,
            timeout: Duration::from_secs_f64(timeout_s),
        })
    }

    pub fn score(&mut self, x: &Scored) -> Result<f64> {
        let fail =
            |msg: String| RewardError::Invalid(format!("reward command `{}`: {msg}", self.name));
        let mut record = serde_json::Map::new();
        for (k, v) in x.fields {
            record.insert(k.clone(), v.clone());
        }
        record.insert("prompt".into(), json!(x.prompt));
        record.insert("reply".into(), json!(x.reply));
        let line = Value::Object(record).to_string();
        writeln!(self.stdin, "{line}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| fail(format!("stopped reading its input ({e})")))?;
        let answer = match self.lines.recv_timeout(self.timeout) {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(fail(format!("unreadable output: {e}"))),
            Err(RecvTimeoutError::Timeout) => {
                return Err(fail(format!(
                    "no answer within {:.1}s to {line}",
                    self.timeout.as_secs_f64()
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.try_wait().ok().flatten();
                return Err(fail(format!(
                    "exited ({}) before answering {line}",
                    status.map_or("still running".into(), |s| s.to_string())
                )));
            }
        };
        let v: f64 = answer.trim().parse().map_err(|_| {
            fail(format!(
                "answered `{}`, not a number, to {line}",
                answer.trim()
            ))
        })?;
        if !v.is_finite() {
            return Err(fail(format!("answered {v} to {line}")));
        }
        Ok(v)
    }
}

impl Drop for CommandReward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn scored<'a>(reply: &'a str, fields: &'a BTreeMap<String, Value>) -> Scored<'a> {
        Scored {
            prompt: "p",
            reply,
            reply_tokens: 1,
            fields,
        }
    }

    #[test]
    fn a_program_scores_and_its_failures_are_named() {
        let f = BTreeMap::new();
        // Answers the reply's length in characters.
        let cmd = |script: &str| vec!["python3".to_string(), "-c".into(), script.to_string()];
        let echo = "import sys, json\nfor l in sys.stdin:\n    print(len(json.loads(l)['reply']), flush=True)";
        let mut r = CommandReward::start(&cmd(echo), 10.0).unwrap();
        assert_eq!(r.score(&scored("abcd", &f)).unwrap(), 4.0);
        assert_eq!(r.score(&scored("ab", &f)).unwrap(), 2.0);
        let bad = "import sys\nfor l in sys.stdin:\n    print('great', flush=True)";
        let e = CommandReward::start(&cmd(bad), 10.0)
            .unwrap()
            .score(&scored("x", &f))
            .unwrap_err();
        assert!(
            e.to_string().contains("answered `great`, not a number"),
            "{e}"
        );
        let hang = "import sys, time\nfor l in sys.stdin:\n    time.sleep(5)";
        let e = CommandReward::start(&cmd(hang), 0.3)
            .unwrap()
            .score(&scored("x", &f))
            .unwrap_err();
        assert!(e.to_string().contains("no answer within 0.3s"), "{e}");
        let quit = "import sys\nsys.exit(3)";
        let mut r = CommandReward::start(&cmd(quit), 10.0).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let e = r.score(&scored("x", &f)).unwrap_err();
        assert!(e.to_string().contains("reward command `python3 -c"), "{e}");
    }
}
