//! What `temper` shows of a pipeline without running anything: status, metrics, the graph,
//! the HTML report with its charts, sweeps compared, runs diffed, samples.

pub mod compare;
pub mod diff;
pub mod graph;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod samples;
pub mod status;
pub mod summary;
