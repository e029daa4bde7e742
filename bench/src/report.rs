//! Results: latency samples, one row per measurement, the table on stdout and the JSON form.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Percentiles {
    /// Median.
    pub(crate) p50_ms: f64,
    /// 99th percentile.
    pub(crate) p99_ms: f64,
    /// 99.9th percentile.
    pub(crate) p999_ms: f64,
}

/// Latency samples of one measurement (microseconds, unsorted).
#[derive(Debug, Default)]
pub(crate) struct Samples {
    micros: Vec<u32>,
}

impl Samples {
    /// An empty set with room for `n` samples.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            micros: Vec::with_capacity(n),
        }
    }

    /// Records one latency.
    pub(crate) fn push(&mut self, d: Duration) {
        self.micros
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    /// Moves `other`'s samples into this set.
    pub(crate) fn merge(&mut self, other: Samples) {
        self.micros.extend(other.micros);
    }

    /// Number of samples.
    pub(crate) fn len(&self) -> usize {
        self.micros.len()
    }

    /// Percentiles, or `None` without samples.
    pub(crate) fn percentiles(&mut self) -> Option<Percentiles> {
        if self.micros.is_empty() {
            return None;
        }
        self.micros.sort_unstable();
        let at = |q: f64| {
            let last = self.micros.len() - 1;
            let i = ((last as f64) * q).round() as usize;
            f64::from(self.micros[i.min(last)]) / 1000.0
        };
        Some(Percentiles {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
        })
    }
}

/// A target from the issue and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    /// What the target says, e.g. "≥ 70% of ceiling".
    pub(crate) text: String,
    /// Whether the measured figure meets it.
    pub(crate) met: bool,
}

/// One measured line of the table.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    /// The scenario this row belongs to.
    pub(crate) scenario: String,
    /// What was measured ("micromsg" lines and "ceiling" lines side by side).
    pub(crate) name: String,
    /// Operations completed.
    pub(crate) count: u64,
    /// Operations that failed.
    pub(crate) errors: u64,
    /// Wall time of the measured phase in seconds.
    pub(crate) seconds: f64,
    /// Throughput in `unit`.
    pub(crate) rate: f64,
    /// Unit of `rate` ("logins/s", "MB/s", ...); for memory rows, "KiB/conn".
    pub(crate) unit: String,
    /// Latency percentiles, where meaningful.
    pub(crate) latency: Option<Percentiles>,
    /// Peak resident memory of the broker (or of the process, see `memory_source`) in KiB.
    pub(crate) peak_memory_kib: Option<u64>,
    /// Where the memory figure comes from.
    pub(crate) memory_source: Option<String>,
    /// The ceiling's rate in the same unit, when this row has one.
    pub(crate) ceiling: Option<f64>,
    /// `rate / ceiling`.
    pub(crate) ratio: Option<f64>,
    /// The target for this row, if any.
    pub(crate) target: Option<Target>,
}

impl Row {
    /// A row with just a rate; fill the rest with the builder methods.
    pub(crate) fn new(
        scenario: &str,
        name: &str,
        count: u64,
        errors: u64,
        elapsed: Duration,
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        Self {
            scenario: scenario.to_owned(),
            name: name.to_owned(),
            count,
            errors,
            seconds,
            rate: if seconds > 0.0 {
                count as f64 / seconds
            } else {
                0.0
            },
            unit: "ops/s".to_owned(),
            latency: None,
            peak_memory_kib: None,
            memory_source: None,
            ceiling: None,
            ratio: None,
            target: None,
        }
    }

    /// Sets the unit of the rate.
    pub(crate) fn unit(mut self, unit: &str) -> Self {
        unit.clone_into(&mut self.unit);
        self
    }

    /// Replaces the rate (for rates not in operations per second, e.g. MB/s).
    pub(crate) fn rate(mut self, rate: f64) -> Self {
        self.rate = rate;
        self
    }

    /// Sets the latency percentiles.
    pub(crate) fn latency(mut self, samples: &mut Samples) -> Self {
        self.latency = samples.percentiles();
        self
    }

    /// Sets the peak memory.
    pub(crate) fn memory(mut self, kib: Option<u64>, source: &str) -> Self {
        self.peak_memory_kib = kib;
        self.memory_source = kib.map(|_| source.to_owned());
        self
    }

    /// Sets the ceiling and computes the ratio.
    pub(crate) fn ceiling(mut self, ceiling: f64) -> Self {
        self.ceiling = Some(ceiling);
        self.ratio = (ceiling > 0.0).then(|| self.rate / ceiling);
        self
    }

    /// Sets a target with its verdict.
    pub(crate) fn target(mut self, text: &str, met: bool) -> Self {
        self.target = Some(Target {
            text: text.to_owned(),
            met,
        });
        self
    }
}

/// Everything one invocation measured.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    /// The rows, in the order measured.
    pub(crate) rows: Vec<Row>,
    /// Remarks (setup facts, caveats) printed under the table.
    pub(crate) notes: Vec<String>,
    /// Scenario-specific data for the JSON (the soak's memory over time and verdict).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) details: Option<serde_json::Value>,
    /// Checks that failed; the process prints the report, then exits non-zero with these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) failures: Vec<String>,
}

impl Report {
    /// Adds a row.
    pub(crate) fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// Adds a note.
    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The results table, for a terminal.
    pub(crate) fn table(&self) -> String {
        let head = [
            "scenario", "measure", "count", "err", "secs", "rate", "unit", "p50 ms", "p99 ms",
            "p99.9 ms", "peak MiB", "ceiling", "ratio", "target",
        ];
        let mut lines: Vec<Vec<String>> = vec![head.iter().map(|s| (*s).to_owned()).collect()];
        for r in &self.rows {
            let lat = |f: fn(&Percentiles) -> f64| {
                r.latency
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |p| format!("{:.2}", f(p)))
            };
            lines.push(vec![
                r.scenario.clone(),
                r.name.clone(),
                r.count.to_string(),
                r.errors.to_string(),
                format!("{:.2}", r.seconds),
                format_rate(r.rate),
                r.unit.clone(),
                lat(|p| p.p50_ms),
                lat(|p| p.p99_ms),
                lat(|p| p.p999_ms),
                r.peak_memory_kib
                    .map_or_else(|| "-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0)),
                r.ceiling.map_or_else(|| "-".to_owned(), format_rate),
                r.ratio
                    .map_or_else(|| "-".to_owned(), |x| format!("{:.0}%", x * 100.0)),
                r.target.as_ref().map_or_else(
                    || "-".to_owned(),
                    |t| format!("{} {}", if t.met { "MET" } else { "MISSED" }, t.text),
                ),
            ]);
        }
        let widths: Vec<usize> = (0..head.len())
            .map(|c| {
                lines
                    .iter()
                    .map(|l| l[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let cells: Vec<String> = line
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| {
                    let pad = w - cell.chars().count();
                    // Text columns left, numbers right.
                    if c < 2 || c == 6 || c == 13 {
                        format!("{cell}{}", " ".repeat(pad))
                    } else {
                        format!("{}{cell}", " ".repeat(pad))
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
            if i == 0 {
                let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }
        for r in &self.rows {
            if let Some(src) = &r.memory_source {
                let _ = writeln!(out, "memory of '{} / {}': {src}", r.scenario, r.name);
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        for f in &self.failures {
            let _ = writeln!(out, "FAILED: {f}");
        }
        out
    }
}

fn format_rate(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_samples() {
        let mut s = Samples::default();
        for i in 1..=1000u64 {
            s.push(Duration::from_micros(i * 1000));
        }
        let p = s.percentiles().expect("samples");
        assert!((p.p50_ms - 501.0).abs() < 1.5, "{p:?}");
        assert!((p.p99_ms - 990.0).abs() < 1.5, "{p:?}");
        assert!((p.p999_ms - 999.0).abs() < 1.5, "{p:?}");
        assert!(Samples::default().percentiles().is_none());
    }

    #[test]
    fn table_has_a_line_per_row() {
        let mut r = Report::default();
        r.push(
            Row::new("x", "micromsg", 10, 0, Duration::from_secs(1))
                .ceiling(20.0)
                .target("≥ 50%", true),
        );
        let t = r.table();
        assert_eq!(t.lines().count(), 3, "{t}");
        assert!(t.contains("50%"), "{t}");
    }
}
