//! The operator's data commands of `micromsg-broker`: `export` and `import` (move entities
//! between brokers of one operator, in the [`export_file`](crate::export_file) format) and
//! `migrate-store` (copy the embedded SQLite store into Postgres). The work is done by
//! `micromsg_store::{portable, migrate}`; this module finds the stores, takes the data
//! directory's lock, writes the file atomically (mode 0600: it holds login secrets) and
//! reports progress on stderr about once a second.

use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, BufWriter, Write as _};
use std::ops::ControlFlow;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use micromsg_store::Store;
use micromsg_store::migrate::{MigrateOutcome, MigrateProgress, migrate};
use micromsg_store::portable::{Bundle, ImportReport};
use zeroize::Zeroize as _;

use crate::config::Config;
use crate::datadir_lock::DataDirLock;
use crate::export_file::{Decoder, encode_bundle, encode_end, encode_header};

/// Entities read per statement batch of an export, by default.
pub const DEFAULT_EXPORT_BATCH_ENTITIES: usize = 500;
/// Rows stored per transaction of an import, by default (whole entities: a batch closes at
/// the first entity boundary past it).
pub const DEFAULT_IMPORT_BATCH_ROWS: usize = 5_000;
/// How often a long run reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long a migrate-store statement may run at the target (a batch of thousands of rows).
const MIGRATE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Says when a progress line is due and the rate so far; time is passed in.
#[derive(Debug)]
pub struct Meter {
    started: Instant,
    last: Instant,
    every: Duration,
}

impl Meter {
    /// A meter started at `now`, due every `every`.
    pub fn new(now: Instant, every: Duration) -> Self {
        Self {
            started: now,
            last: now,
            every,
        }
    }

    /// Whether a line is due at `now` (and if so, the next one is `every` later).
    pub fn due(&mut self, now: Instant) -> bool {
        if now.duration_since(self.last) >= self.every {
            self.last = now;
            true
        } else {
            false
        }
    }

    /// `count` per second since the start.
    pub fn rate(&self, count: u64, now: Instant) -> u64 {
        let secs = now.duration_since(self.started).as_secs_f64();
        if secs <= 0.0 {
            0
        } else {
            (count as f64 / secs) as u64
        }
    }

    /// Time since the start.
    pub fn elapsed(&self, now: Instant) -> Duration {
        now.duration_since(self.started)
    }
}

/// Which entities an export takes.
#[derive(Debug)]
pub enum Selection {
    /// Every entity of the broker.
    All,
    /// These numbers (each must exist).
    Numbers(Vec<String>),
}

/// Opens the store `config` names for an existing broker: its Postgres database, or its
/// SQLite file, which must exist (a wrong --data-dir must not make an empty store).
async fn open_existing(config: &Config) -> anyhow::Result<Store> {
    if config.database.url.is_none() {
        let path = crate::run::sqlite_path(&config.server.data_dir);
        if !path.exists() {
            bail!(
                "no store at {}: is --data-dir (or --config) the broker's?",
                path.display()
            );
        }
    }
    crate::run::open_store(config)
        .await
        .context("opening the store")
}

/// A file `path` is written through: a temporary file beside it, mode 0600, renamed over
/// `path` once complete and synced, so a reader never sees half a file.
struct AtomicFile {
    tmp: PathBuf,
    path: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    fn create(path: &Path) -> anyhow::Result<Self> {
        let name = path
            .file_name()
            .with_context(|| format!("{} is not a file name", path.display()))?;
        let tmp = path.with_file_name(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            tmp,
            path: path.to_owned(),
            out: Some(BufWriter::new(file)),
        })
    }

    fn line(&mut self, line: &str) -> anyhow::Result<()> {
        let out = self.out.as_mut().context("file already closed")?;
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        Ok(())
    }

    fn commit(mut self) -> anyhow::Result<()> {
        let out = self.out.take().context("file already closed")?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("renaming into {}", self.path.display()))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    /// An export that failed leaves no partial file behind.
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// What an export wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Entities written.
    pub entities: u64,
    /// Row lines written.
    pub rows: u64,
}

/// `micromsg-broker export`: writes the selected entities to `out`.
pub async fn export(
    config: &Config,
    selection: Selection,
    out: &Path,
    batch_entities: usize,
    now_unix: i64,
) -> anyhow::Result<ExportSummary> {
    let store = open_existing(config).await?;
    let batch = batch_entities.max(1);
    if let Selection::Numbers(numbers) = &selection {
        for n in numbers {
            micromsg_store::Number::new(n.as_str())
                .map_err(|_| anyhow::anyhow!("--entity {n:?} is not an entity number"))?;
        }
    }
    let mut file = AtomicFile::create(out)?;
    file.line(&encode_header(now_unix, &config.server.broker_id))?;
    let mut summary = ExportSummary::default();
    let mut meter = Meter::new(Instant::now(), PROGRESS_EVERY);
    let mut after: Option<String> = None;
    let mut given = match &selection {
        Selection::Numbers(n) => n.chunks(batch).map(<[String]>::to_vec).collect(),
        Selection::All => Vec::new(),
    }
    .into_iter();
    loop {
        let numbers = match &selection {
            Selection::All => {
                let page = store.entity_numbers(after.as_deref(), batch).await?;
                after = page.last().cloned();
                page
            }
            Selection::Numbers(_) => given.next().unwrap_or_default(),
        };
        if numbers.is_empty() {
            break;
        }
        let bundles = store.export_bundles(&numbers).await?;
        if let Some(missing) = numbers
            .iter()
            .find(|n| !bundles.iter().any(|b| &b.number == *n))
        {
            bail!("no entity {missing} at this broker; nothing was written");
        }
        for bundle in &bundles {
            for mut line in encode_bundle(bundle) {
                file.line(&line)?;
                line.zeroize();
                summary.rows += 1;
            }
            summary.entities += 1;
        }
        let now = Instant::now();
        if meter.due(now) {
            eprintln!(
                "export: {} entities, {} rows ({} rows/s)",
                summary.entities,
                summary.rows,
                meter.rate(summary.rows, now)
            );
        }
    }
    file.line(&encode_end(summary.entities, summary.rows))?;
    file.commit()?;
    store.close().await;
    Ok(summary)
}

/// An export file read entity by entity.
struct FileReader<'a> {
    path: &'a Path,
    reader: BufReader<File>,
    decoder: Decoder,
    line: String,
    finished: bool,
}

impl<'a> FileReader<'a> {
    fn open(path: &'a Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            path,
            reader: BufReader::new(file),
            decoder: Decoder::new(),
            line: String::new(),
            finished: false,
        })
    }

    /// The next whole entity; `None` at the end of a complete file.
    fn next_bundle(&mut self) -> anyhow::Result<Option<Bundle>> {
        let damaged = || format!("{} is damaged", self.path.display());
        while !self.finished {
            self.line.zeroize();
            self.line.clear();
            let read = self
                .reader
                .read_line(&mut self.line)
                .with_context(|| format!("reading {}", self.path.display()))?;
            if read == 0 {
                self.finished = true;
                std::mem::take(&mut self.decoder)
                    .finish()
                    .with_context(damaged)?;
                break;
            }
            if let Some(bundle) = self
                .decoder
                .line(self.line.trim_end_matches(['\n', '\r']))
                .with_context(damaged)?
            {
                return Ok(Some(bundle));
            }
        }
        Ok(None)
    }
}

impl Drop for FileReader<'_> {
    fn drop(&mut self) {
        self.line.zeroize();
    }
}

/// `micromsg-broker import`: checks the whole file, then stores its entities in batches of
/// about `batch_rows` rows. An entity at this broker with other data is reported, not
/// overwritten (see `micromsg_store::portable`).
pub async fn import(
    config: &Config,
    path: &Path,
    batch_rows: usize,
) -> anyhow::Result<ImportReport> {
    // The SQLite store must not be written under a serving broker (Postgres takes writers
    // side by side).
    let _lock = match config.database.url {
        Some(_) => None,
        None => {
            let dir = &config.server.data_dir;
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating data directory {}", dir.display()))?;
            Some(DataDirLock::acquire(dir)?)
        }
    };
    // First a pass that stores nothing: a damaged file is refused before any write.
    let (mut entities, mut rows) = (0u64, 0u64);
    let mut check = FileReader::open(path)?;
    while let Some(b) = check.next_bundle()? {
        entities += 1;
        rows += b.rows() as u64;
    }
    drop(check);
    eprintln!(
        "import: {} checked: {entities} entities, {rows} rows",
        path.display()
    );
    let store = crate::run::open_store(config)
        .await
        .context("opening the store")?;
    eprintln!(
        "import: into the {} store{}",
        store.backend_name(),
        match config.database.url {
            Some(_) => String::new(),
            None => format!(
                " {}",
                crate::run::sqlite_path(&config.server.data_dir).display()
            ),
        }
    );
    let mut report = ImportReport::default();
    let mut pending: Vec<Bundle> = Vec::new();
    let mut pending_rows = 0;
    let mut meter = Meter::new(Instant::now(), PROGRESS_EVERY);
    let batch_rows = batch_rows.max(1);
    let mut file = FileReader::open(path)?;
    while let Some(bundle) = file.next_bundle()? {
        pending_rows += bundle.rows();
        pending.push(bundle);
        if pending_rows < batch_rows {
            continue;
        }
        report.add(store.import_bundles(&pending).await?);
        pending.clear();
        pending_rows = 0;
        let now = Instant::now();
        if meter.due(now) {
            let done = report.rows_inserted + report.rows_skipped;
            let seen =
                report.entities_new + report.entities_present + report.conflicts.len() as u64;
            eprintln!(
                "import: {seen} of {entities} entities, {done} of {rows} rows ({} rows/s)",
                meter.rate(done, now)
            );
        }
    }
    report.add(store.import_bundles(&pending).await?);
    store.close().await;
    Ok(report)
}

/// `micromsg-broker migrate-store`: copies this broker's SQLite store into the Postgres
/// database at `to`, resumably, and verifies the counts. Refuses while the broker serves.
pub async fn migrate_store(config: &Config, to: &str, batch_rows: usize) -> anyhow::Result<()> {
    if config.database.url.is_some() {
        bail!(
            "this broker's store is already Postgres (database.url is set): migrate-store \
             copies the embedded SQLite store of --data-dir"
        );
    }
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        bail!("--to must be a postgres:// URL");
    }
    let dir = &config.server.data_dir;
    let path = crate::run::sqlite_path(dir);
    if !path.exists() {
        bail!(
            "no SQLite store at {}: is --data-dir right?",
            path.display()
        );
    }
    let _lock = DataDirLock::acquire(dir)?;
    let source = Store::open_sqlite_with(&path, 2)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    // The URL is never printed: it may carry a password.
    let target = Store::connect_postgres(to, 4, MIGRATE_STATEMENT_TIMEOUT)
        .await
        .context("connecting to the Postgres database given by --to")?;
    eprintln!("migrate-store: copying {} into Postgres", path.display());
    let mut meter = Meter::new(Instant::now(), PROGRESS_EVERY);
    let outcome = migrate(&source, &target, batch_rows, |p: &MigrateProgress| {
        let now = Instant::now();
        // About once a second, and at the end of every table.
        if meter.due(now) || p.done == p.total {
            eprintln!(
                "migrate-store: {:<20} {:>9} of {:>9} rows ({} rows/s overall)",
                p.table,
                p.done,
                p.total,
                meter.rate(p.done_all, now)
            );
        }
        ControlFlow::Continue(())
    })
    .await
    .context("copying the store")?;
    let elapsed = meter.elapsed(Instant::now());
    source.close().await;
    target.close().await;
    let MigrateOutcome::Done(counts) = &outcome else {
        bail!("the copy stopped before the end; run migrate-store again to continue");
    };
    println!(
        "{:<22} {:>10} {:>10} {:>10}",
        "table", "sqlite", "postgres", "copied now"
    );
    for c in counts {
        println!(
            "{:<22} {:>10} {:>10} {:>10}",
            c.table, c.source, c.target, c.inserted
        );
    }
    let bad = outcome.mismatches();
    if !bad.is_empty() {
        let names: Vec<_> = bad.iter().map(|c| c.table).collect();
        bail!(
            "row counts differ for {}: the Postgres database held other rows before, or the \
             SQLite store changed; use an empty database",
            names.join(", ")
        );
    }
    println!(
        "verified: every table has the same rows in Postgres ({:.1} s). Start the broker on \
         it with --database-url (or [database] url) and the same --data-dir (TLS files and \
         identity key stay there).",
        elapsed.as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_meter_is_due_once_a_period_and_rates_since_the_start() {
        let t0 = Instant::now();
        let mut m = Meter::new(t0, Duration::from_secs(1));
        assert!(!m.due(t0 + Duration::from_millis(999)));
        assert!(m.due(t0 + Duration::from_millis(1000)));
        assert!(!m.due(t0 + Duration::from_millis(1500)));
        assert!(m.due(t0 + Duration::from_millis(2000)));
        assert_eq!(m.rate(5_000, t0 + Duration::from_secs(2)), 2_500);
        assert_eq!(m.rate(5_000, t0), 0);
    }
}
