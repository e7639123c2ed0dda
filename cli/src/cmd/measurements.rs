//! This machine's measurements (`gantry bench` writes them; `inspect` and `select` read them):
//! a JSON list of `gantry_core::measured::Measurement` in `measurements.json` beside the
//! embedded store (`$XDG_DATA_HOME/gantry/`, else `~/.local/share/gantry/`), or the file
//! `GANTRY_MEASUREMENTS` names.

use std::path::{Path, PathBuf};

use gantry_core::measured::Measurement;
use gantry_core::units::format_bytes;

use crate::cmd::table::Table;
use crate::error::CliError;

/// The file.
pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("GANTRY_MEASUREMENTS") {
        return PathBuf::from(p);
    }
    crate::cmd::up::data_dir().join("measurements.json")
}

/// Every measurement in the file (none when there is no file).
pub fn load(path: &Path) -> Result<Vec<Measurement>, CliError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            CliError::with_code(
                format!("{}: not a measurements file ({e}); move it away and run `gantry bench` again", path.display()),
                CliError::DATA,
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(CliError::with_code(format!("cannot read {}: {e}", path.display()), CliError::IO)),
    }
}

/// Folds `m` into the file's measurement of the same (digest, device kind), or adds it; the file
/// is replaced whole (a reader never sees half of it).
pub fn record(path: &Path, m: Measurement) -> Result<(), CliError> {
    let mut all = load(path)?;
    match all.iter_mut().find(|x| x.digest == m.digest && x.device_kind == m.device_kind) {
        Some(x) => x.merge(m),
        None => all.push(m),
    }
    let io = |e: std::io::Error| CliError::with_code(format!("cannot write {}: {e}", path.display()), CliError::IO);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&all)?).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// This machine's device kinds: its CPU, and its GPUs as NVML names them (when NVML loads).
pub fn here() -> Vec<String> {
    let mut kinds = vec![gantry_worker::measure::cpu_kind()];
    if let Ok(gpus) = gantry_worker::gpu::NvmlInventory::new().and_then(|n| {
        use gantry_worker::gpu::GpuInventory;
        n.gpus()
    }) {
        kinds.extend(gpus.into_iter().map(|g| g.name));
    }
    kinds
}

/// A measurement's terms, estimated beside measured with each one's error (`-` where a term
/// was not measured); `first` heads the terms' column. What `bench` and `inspect` print.
pub fn terms_table(m: &Measurement, first: &str) -> Table {
    let mut t = Table::new(&[first, "ESTIMATED", "MEASURED", "ERROR"]);
    let e = m.error_percent();
    let errors = [e.weights, e.kv_cache, e.activations, e.overhead];
    for (((name, est), (_, meas)), err) in m.estimated.named().iter().zip(m.measured.named()).zip(errors) {
        t.row(vec![
            name.replace('_', " "),
            format_bytes(*est),
            if meas > 0 { format_bytes(meas) } else { "-".into() },
            percent(err),
        ]);
    }
    t
}

/// An error in percent, signed, or `-`.
pub fn percent(error: Option<f64>) -> String {
    error.map_or_else(|| "-".into(), |e| format!("{e:+.0}%"))
}

/// The measurements of `model` (a path: by its files' digest; else a catalog id or source).
pub fn of(all: &[Measurement], model: &str) -> Vec<Measurement> {
    let p = Path::new(model);
    let digest = p.exists().then(|| gantry_model::digest(p).ok()).flatten();
    all.iter()
        .filter(|m| match &digest {
            Some(d) => &m.digest == d,
            None => m.is_of(model),
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_record_of_one_model_and_kind_merges_and_another_kind_adds() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub").join("measurements.json");
        assert!(load(&file).unwrap().is_empty());
        let m =
            Measurement { digest: "sha256s:aa".into(), device_kind: "cpu:A".into(), load_ms: 5, ..Default::default() };
        record(&file, m.clone()).unwrap();
        record(&file, Measurement { load_ms: 7, ..m.clone() }).unwrap();
        record(&file, Measurement { device_kind: "cpu:B".into(), ..m }).unwrap();
        let all = load(&file).unwrap();
        assert_eq!(
            all.iter().map(|m| (m.device_kind.as_str(), m.load_ms)).collect::<Vec<_>>(),
            [("cpu:A", 7), ("cpu:B", 5)]
        );
        std::fs::write(&file, "not json").unwrap();
        let e = load(&file).unwrap_err();
        assert!(e.message().contains("not a measurements file"), "{}", e.message());
    }
}
