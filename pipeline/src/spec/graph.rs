//! The DAG's shape: the edges' problems (dangling references, self-references, cycles) found
//! while a file loads, and the orders a loaded pipeline is walked in.

use std::collections::{BTreeMap, BTreeSet};

use super::{find_line, stage_line, Pipeline, Problem, Stage};

/// Dangling references, self-references and cycles.
pub(super) fn graph_problems(text: &str, stages: &[Stage]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let names: BTreeSet<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    for s in stages {
        for p in &s.parents {
            if !names.contains(p.as_str()) {
                let l = find_line(text, |l| {
                    l.contains(&format!("${{{p}."))
                        || l.contains(&format!("needs: [{p}"))
                        || l.contains(&format!("- {p}"))
                })
                .or_else(|| stage_line(text, &s.name));
                problems.push(Problem {
                    line: l,
                    message: format!("stage `{}` refers to `{p}`, which is not a stage", s.name),
                });
            }
            if p == &s.name {
                problems.push(Problem {
                    line: stage_line(text, &s.name),
                    message: format!("stage `{p}` refers to itself"),
                });
            }
        }
    }
    if let Some(cycle) = find_cycle(stages) {
        problems.push(Problem {
            line: stage_line(text, &cycle[0]),
            message: format!("cycle: {}", cycle.join(" -> ")),
        });
    }
    problems
}

/// A dependency cycle as a path (first stage repeated at the end), if any.
fn find_cycle(stages: &[Stage]) -> Option<Vec<String>> {
    let parents: BTreeMap<&str, &BTreeSet<String>> = stages
        .iter()
        .map(|s| (s.name.as_str(), &s.parents))
        .collect();
    // 0 = unvisited, 1 = on the current path, 2 = done.
    fn visit<'a>(
        n: &'a str,
        parents: &BTreeMap<&'a str, &'a BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n, 1);
        path.push(n);
        if let Some(ps) = parents.get(n) {
            for p in ps.iter() {
                if parents.contains_key(p.as_str()) {
                    if let Some(c) = visit(p.as_str(), parents, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(n, 2);
        None
    }
    let mut state = BTreeMap::new();
    for s in stages {
        if let Some(mut c) = visit(&s.name, &parents, &mut state, &mut Vec::new()) {
            // Written as dependency order: a stage, then the stage that needs it.
            c.reverse();
            return Some(c);
        }
    }
    None
}

impl Pipeline {
    /// Stages in dependency order (parents first), ties in file order.
    /// Parents before children. The file's checks refuse cycles, dangling references and
    /// duplicate names before a pipeline exists; should one slip through, the stages it
    /// strands are left out rather than looped over forever.
    pub fn topo_order(&self) -> Vec<&Stage> {
        let mut done: BTreeSet<&str> = BTreeSet::new();
        let mut order = Vec::new();
        loop {
            let before = order.len();
            for s in &self.stages {
                if !done.contains(s.name.as_str())
                    && s.parents.iter().all(|p| done.contains(p.as_str()))
                {
                    done.insert(&s.name);
                    order.push(s);
                }
            }
            if order.len() == before {
                return order;
            }
        }
    }

    /// Every stage downstream of `name` (not including it).
    pub fn descendants(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut frontier = vec![name.to_string()];
        while let Some(n) = frontier.pop() {
            for s in &self.stages {
                if s.parents.contains(&n) && out.insert(s.name.clone()) {
                    frontier.push(s.name.clone());
                }
            }
        }
        out
    }
}
