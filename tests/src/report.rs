//! The table a suite prints at its end: what was tried and what survived.

use std::fmt;

/// One row: a scenario run with one seed.
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub seed: u64,
    /// The faults injected, e.g. "SIGKILL mount0 after 740 ms".
    pub faults: Vec<String>,
    /// Operations whose outcome was checked (files read back, records found, ...).
    pub checked: u64,
    pub elapsed: std::time::Duration,
    /// `Err` with the reason when the scenario failed.
    pub outcome: Result<(), String>,
}

/// Rows grouped by scenario, as a Markdown table.
pub struct Table(pub Vec<Row>);

impl Table {
    pub fn failed(&self) -> usize {
        self.0.iter().filter(|r| r.outcome.is_err()).count()
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| scenario | seed | faults injected | ops checked | time | outcome |")?;
        writeln!(f, "|---|---|---|---|---|---|")?;
        for r in &self.0 {
            let outcome = match &r.outcome {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("FAILED: {}", e.lines().next().unwrap_or("")),
            };
            writeln!(
                f,
                "| {} | {} | {} | {} | {:.1} s | {} |",
                r.scenario,
                r.seed,
                r.faults.join("; "),
                r.checked,
                r.elapsed.as_secs_f64(),
                outcome
            )?;
        }
        Ok(())
    }
}
