//! Gates: conditions a stage puts on its parents' results before it may run, e.g.
//! `gate: ["reward.accuracy >= 0.70", "sft.loss < 5.5"]`. Each reads a number from the named
//! stage's `summary.json`; when one fails, the stage and its descendants do not run and
//! `temper run` names the condition and the measured value.

use std::fmt;

use serde_json::Value as Json;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
    Ne,
}

impl Op {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Ge => a >= b,
            Op::Gt => a > b,
            Op::Le => a <= b,
            Op::Lt => a < b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Op::Ge => ">=",
            Op::Gt => ">",
            Op::Le => "<=",
            Op::Lt => "<",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    /// The stage whose summary is read (a parent; after matrix expansion, the parent of the
    /// same branch).
    pub stage: String,
    /// A key of its summary.json, e.g. `accuracy` or `reward/mean`.
    pub metric: String,
    pub op: Op,
    pub threshold: f64,
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{} {} {}",
            self.stage,
            self.metric,
            self.op.symbol(),
            self.threshold
        )
    }
}

/// Parses `STAGE.METRIC OP NUMBER`.
pub fn parse(text: &str) -> Result<Gate, String> {
    let bad = || {
        format!("gate `{text}`: write it as `STAGE.METRIC OP NUMBER`, e.g. `reward.accuracy >= 0.7` (OP one of >= > <= < == !=)")
    };
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [target, op, number] = parts[..] else {
        return Err(bad());
    };
    let (stage, metric) = target.split_once('.').ok_or_else(bad)?;
    let op = match op {
        ">=" => Op::Ge,
        ">" => Op::Gt,
        "<=" => Op::Le,
        "<" => Op::Lt,
        "==" => Op::Eq,
        "!=" => Op::Ne,
        _ => return Err(bad()),
    };
    let threshold: f64 = number.parse().map_err(|_| bad())?;
    if stage.is_empty() || metric.is_empty() || !threshold.is_finite() {
        return Err(bad());
    }
    Ok(Gate {
        stage: stage.into(),
        metric: metric.into(),
        op,
        threshold,
    })
}

impl Gate {
    /// Ok when the condition holds on `summary`; else why not, with the measured value.
    pub fn check(&self, summary: Option<&Json>) -> Result<(), String> {
        match summary
            .and_then(|s| s.get(&self.metric))
            .and_then(Json::as_f64)
        {
            Some(v) if self.op.holds(v, self.threshold) => Ok(()),
            Some(v) => Err(format!(
                "{self} failed: {}.{} = {v:.4}",
                self.stage, self.metric
            )),
            None => Err(format!(
                "{self} failed: {} reports no `{}` in its summary.json",
                self.stage, self.metric
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gates_parse_and_check_with_the_measured_value() {
        let g = parse("reward.accuracy >= 0.70").unwrap();
        assert_eq!(
            (g.stage.as_str(), g.metric.as_str(), g.op),
            ("reward", "accuracy", Op::Ge)
        );
        assert!(g.check(Some(&json!({"accuracy": 0.8}))).is_ok());
        assert_eq!(
            g.check(Some(&json!({"accuracy": 0.55}))).unwrap_err(),
            "reward.accuracy >= 0.7 failed: reward.accuracy = 0.5500"
        );
        assert!(g.check(None).unwrap_err().contains("reports no `accuracy`"));
        let slash = parse("ppo.reward/mean > -1").unwrap();
        assert_eq!(slash.metric, "reward/mean");
        for bad in [
            "reward.accuracy >= x",
            "accuracy >= 1",
            "reward.accuracy => 1",
            "a.b >= 1 2",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
