//! Sweeps: `matrix: {seed: [1, 2, 3]}` (or any key: `optim.lr`, `peft.r`, `loss`) on a stage
//! expands it and every stage downstream of it into named branches, e.g. `reward@seed=1`,
//! `ppo@seed=1`. Branches share everything upstream and are cached like any stage. A stage
//! below two expanded stages gets one branch per compatible pair: sweeps of the same key align
//! by value (`ppo@seed=1` meets `dpo@seed=1`, not `dpo@seed=2`), different keys combine.
//! `seed` in a matrix also seeds every stage downstream of it in that branch, so a seed sweep
//! repeats the whole chain; other keys apply to the stage that declares them.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use crate::spec::{set_dotted, Stage};

/// One branch: (declaring stage, key, value), in declaration order.
pub type Assignment = Vec<(String, String, Value)>;

/// Two branches can meet when every key they share has the same value.
fn compatible(a: &Assignment, b: &Assignment) -> bool {
    b.iter().all(|(_, k, v)| {
        a.iter()
            .find(|(_, k2, _)| k2 == k)
            .is_none_or(|(_, _, v2)| v2 == v)
    })
}

fn merge(a: &Assignment, b: &Assignment) -> Assignment {
    let mut out = a.clone();
    for e in b {
        if !out.iter().any(|(_, k, _)| *k == e.1) {
            out.push(e.clone());
        }
    }
    out
}

/// A value as it appears in a branch name.
pub fn render(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => "none".into(),
        // A mapping (a `peft:` block, say) reads as its `method` (or first value), then each
        // other key with its value, or alone when it is `true`: `lora+r16+dora`.
        Value::Mapping(m) => {
            let mut parts = Vec::new();
            if let Some(method) = m.get("method") {
                parts.push(render(method));
            }
            for (k, v) in m {
                let k = render(k);
                if k == "method" {
                    continue;
                }
                match v {
                    Value::Bool(true) => parts.push(k),
                    Value::Bool(false) => {}
                    other => parts.push(format!("{k}{}", render(other))),
                }
            }
            parts.join("+")
        }
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    };
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `reward@seed=1`, `dpo@loss=ipo,seed=2`; a key swept by two stages is qualified with its
/// stage (`reward.seed=1,dpo.seed=2`).
pub fn branch_name(group: &str, a: &Assignment) -> String {
    let parts: Vec<String> = a
        .iter()
        .map(|(o, k, v)| {
            let shared = a.iter().filter(|(_, k2, _)| k2 == k).count() > 1;
            let key = if shared {
                format!("{o}.{k}")
            } else {
                k.clone()
            };
            format!("{key}={}", render(v))
        })
        .collect();
    format!("{group}@{}", parts.join(","))
}

/// Every combination of a stage's own matrix values.
fn own_combinations(stage: &Stage) -> Vec<Assignment> {
    let mut out: Vec<Assignment> = vec![Vec::new()];
    for (key, values) in &stage.matrix {
        out = out
            .iter()
            .flat_map(|a| {
                values.iter().map(move |v| {
                    let mut b = a.clone();
                    b.push((stage.group.clone(), key.clone(), v.clone()));
                    b
                })
            })
            .collect();
    }
    out
}

/// Replaces `${parent.` with `${branch.` in every string of `v`.
fn rename_refs(v: &mut Value, renames: &BTreeMap<String, String>) {
    match v {
        Value::String(s) => {
            for (from, to) in renames {
                *s = s.replace(&format!("${{{from}."), &format!("${{{to}."));
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(|i| rename_refs(i, renames)),
        Value::Mapping(m) => m.iter_mut().for_each(|(_, i)| rename_refs(i, renames)),
        _ => {}
    }
}

/// Expands every stage with a matrix, and everything downstream of one, into branches.
/// `stages` must be in dependency order.
pub fn expand(stages: Vec<Stage>) -> anyhow::Result<Vec<Stage>> {
    let mut branches: BTreeMap<String, Vec<(Assignment, String)>> = BTreeMap::new();
    let mut out = Vec::new();
    for st in stages {
        let mut inherited: Vec<Assignment> = vec![Vec::new()];
        for p in &st.parents {
            let pb = &branches[p];
            inherited = inherited
                .iter()
                .flat_map(|a| {
                    pb.iter()
                        .filter(|(b, _)| compatible(a, b))
                        .map(|(b, _)| merge(a, b))
                        .collect::<Vec<_>>()
                })
                .collect();
        }
        let own = own_combinations(&st);
        let mut mine = Vec::new();
        for a in &inherited {
            for o in &own {
                let assignment = merge(a, o);
                let name = if assignment.is_empty() {
                    st.group.clone()
                } else {
                    branch_name(&st.group, &assignment)
                };
                mine.push((assignment, name));
            }
        }
        for (assignment, name) in &mine {
            anyhow::ensure!(
                !out.iter().any(|s: &Stage| s.name == *name),
                "stage `{}`: two branches are both named `{name}`; give the matrix values that make them names that differ",
                st.group
            );
            out.push(branch(&st, assignment, name, &branches)?);
        }
        branches.insert(st.group.clone(), mine);
    }
    Ok(out)
}

/// The stage of one branch: its parameters with the branch's values set, and its parents,
/// references and gates pointing at the parents' matching branches.
fn branch(
    st: &Stage,
    assignment: &Assignment,
    name: &str,
    branches: &BTreeMap<String, Vec<(Assignment, String)>>,
) -> anyhow::Result<Stage> {
    let mut params: Mapping = st.params.clone();
    // An inherited seed first, the stage's own values last, so its own seed sweep wins.
    let inherited_seeds = assignment
        .iter()
        .filter(|(o, k, _)| o != &st.group && k == "seed");
    let own = assignment.iter().filter(|(o, _, _)| o == &st.group);
    for (_, key, value) in inherited_seeds.chain(own) {
        set_dotted(&mut params, key, value.clone())
            .map_err(|e| anyhow::anyhow!("stage `{}`: matrix key `{key}`: {e}", st.group))?;
    }
    let mut renames = BTreeMap::new();
    for p in &st.parents {
        let (_, pname) = branches[p]
            .iter()
            .find(|(b, _)| {
                compatible(assignment, b)
                    && b.iter()
                        .all(|e| assignment.iter().any(|x| x.1 == e.1 && x.2 == e.2))
            })
            .expect("every branch descends from a branch of each parent");
        if pname != p {
            renames.insert(p.clone(), pname.clone());
        }
    }
    let mut value = Value::Mapping(params);
    rename_refs(&mut value, &renames);
    let Value::Mapping(params) = value else {
        unreachable!("a mapping stays a mapping")
    };
    let rename = |s: &String| renames.get(s).cloned().unwrap_or_else(|| s.clone());
    Ok(Stage {
        name: name.to_string(),
        group: st.group.clone(),
        uses: st.uses,
        params,
        parents: st.parents.iter().map(rename).collect(),
        matrix: Vec::new(),
        gates: st
            .gates
            .iter()
            .map(|g| crate::spec::gate::Gate {
                stage: rename(&g.stage),
                ..g.clone()
            })
            .collect(),
        resources: st.resources.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn stage(name: &str, parents: &[&str], matrix: &[(&str, &[i64])], params: &str) -> Stage {
        Stage {
            name: name.into(),
            group: name.into(),
            uses: temper_stage::StageKind::Sft,
            params: serde_yaml::from_str(params).unwrap(),
            parents: parents
                .iter()
                .map(|p| p.to_string())
                .collect::<BTreeSet<_>>(),
            matrix: matrix
                .iter()
                .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| Value::from(*v)).collect()))
                .collect(),
            gates: Vec::new(),
            resources: Default::default(),
        }
    }

    #[test]
    fn mapping_values_get_readable_branch_names() {
        let v = |y: &str| serde_yaml::from_str::<Value>(y).unwrap();
        assert_eq!(
            render(&v("{method: lora, r: 16, dora: true}")),
            "lora+r16+dora"
        );
        assert_eq!(
            render(&v("{method: freeze, top_layers: 1}")),
            "freeze+top_layers1"
        );
        assert_eq!(render(&v("{method: head}")), "head");
        assert_eq!(render(&v("null")), "none");
        assert_eq!(render(&v("{r: 4, rslora: false}")), "r4");
    }

    #[test]
    fn a_seed_sweep_repeats_the_chain_below_it() {
        let stages = vec![
            stage("sft", &[], &[], "{seed: 0}"),
            stage(
                "reward",
                &["sft"],
                &[("seed", &[1, 2])],
                "{init: '${sft.checkpoint}', seed: 0}",
            ),
            stage(
                "ppo",
                &["sft", "reward"],
                &[],
                "{policy: '${sft.checkpoint}', reward_model: '${reward.checkpoint}', seed: 0}",
            ),
        ];
        let out = expand(stages).unwrap();
        let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "sft",
                "reward@seed=1",
                "reward@seed=2",
                "ppo@seed=1",
                "ppo@seed=2"
            ]
        );
        let ppo2 = &out[4];
        assert_eq!(
            ppo2.params["seed"],
            Value::from(2),
            "the seed reaches downstream stages"
        );
        assert_eq!(
            ppo2.params["reward_model"],
            Value::from("${reward@seed=2.checkpoint}")
        );
        assert_eq!(
            ppo2.params["policy"],
            Value::from("${sft.checkpoint}"),
            "shared upstream"
        );
        assert!(ppo2.parents.contains("reward@seed=2") && ppo2.parents.contains("sft"));
    }

    #[test]
    fn sweeps_of_the_same_key_align_by_value() {
        let stages = vec![
            stage("sft", &[], &[], "{seed: 0}"),
            stage("ppo", &["sft"], &[("seed", &[1, 2])], "{seed: 0}"),
            stage("dpo", &["sft"], &[("seed", &[1, 2])], "{seed: 0}"),
            stage(
                "eval",
                &["ppo", "dpo"],
                &[],
                "{a: '${ppo.out}', b: '${dpo.out}'}",
            ),
        ];
        let out = expand(stages).unwrap();
        let evals: Vec<&Stage> = out.iter().filter(|s| s.group == "eval").collect();
        assert_eq!(evals.len(), 2, "aligned, not 2 × 2");
        assert_eq!(evals[1].name, "eval@seed=2");
        assert_eq!(evals[1].params["b"], Value::from("${dpo@seed=2.out}"));
    }

    #[test]
    fn two_sweeps_cross_and_a_shared_sweep_aligns() {
        let stages = vec![
            stage("a", &[], &[("seed", &[1, 2])], "{seed: 0}"),
            stage(
                "b",
                &["a"],
                &[("steps", &[10, 20])],
                "{x: '${a.out}', steps: 5}",
            ),
            stage("c", &["a", "b"], &[], "{}"),
        ];
        let out = expand(stages).unwrap();
        let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 2 + 4 + 4, "{names:?}");
        assert!(names.contains(&"b@seed=1,steps=20"));
        let c = out.iter().find(|s| s.name == "c@seed=2,steps=10").unwrap();
        assert!(c.parents.contains("a@seed=2") && c.parents.contains("b@seed=2,steps=10"));
        assert_eq!(
            out.iter()
                .find(|s| s.name == "b@seed=1,steps=20")
                .unwrap()
                .params["steps"],
            Value::from(20)
        );
    }
}
