//! Measured truth in the controller: the measurements workers report (at each load, then with
//! each heartbeat as they serve) and `gantry bench --controller` records, kept per (model digest,
//! device kind) in the state store under `measurements/<digest>/<device kind, hex>`, so they
//! outlive the controller. Placement sizes a deployment by them ([`State::measured_need`]);
//! `inspect`, `select` and `gantry get models` show them beside the estimate.

use std::collections::{BTreeMap, HashMap};

use gantry_core::measured::{Calibration, Measurement, calibrate};
use gantry_core::vram::DeviceKind;
use gantry_proto::v1 as pb;
use tracing::{info, warn};

use super::persist::{StoreOp, to_json};
use super::state::State;
use crate::spec::SizedModel;

/// Heartbeats refresh a measurement's speed in the store at most this often (memory figures
/// and new sources are written at once).
pub const SPEED_WRITE_MS: u64 = 30_000;
/// Measurements kept (the oldest beyond it are dropped): a bound on what hostile or runaway
/// reports can grow.
pub const MAX_MEASUREMENTS: usize = 4096;

/// The store prefix.
pub const PREFIX: &str = "measurements/";

/// The measurements the controller holds.
#[derive(Debug, Default)]
pub struct Measurements {
    by_key: BTreeMap<(String, String), Measurement>,
    /// `measured_at_ms` of each one's last write to the store.
    written_at: HashMap<(String, String), u64>,
}

/// The store key of a measurement.
pub fn store_key(digest: &str, device_kind: &str) -> String {
    let kind: String = device_kind.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{PREFIX}{digest}/{kind}")
}

/// Whether a reported measurement is one to keep: named (a digest and a device kind), and every
/// string and list within bounds (a worker's report, or `Models/Record`'s, must not grow the
/// controller's memory or store without limit).
pub fn sane(m: &Measurement) -> Result<(), String> {
    let long = |what: &str, s: &str, max: usize| {
        if s.len() > max { Err(format!("{what} is {} bytes, at most {max}", s.len())) } else { Ok(()) }
    };
    if m.digest.is_empty() || m.device_kind.trim().is_empty() {
        return Err("a measurement names its model's digest and its device kind".into());
    }
    long("digest", &m.digest, 128)?;
    long("device_kind", &m.device_kind, 256)?;
    long("model", &m.model, 512)?;
    long("method", &m.method, 16)?;
    long("by", &m.by, 256)?;
    if m.sources.len() > gantry_core::measured::MAX_SOURCES || m.speed.len() > 64 {
        return Err(format!("at most {} sources and 64 speed points", gantry_core::measured::MAX_SOURCES));
    }
    for s in &m.sources {
        long("a source", s, 4096)?;
    }
    Ok(())
}

impl Measurements {
    /// A measurement read back from the store.
    pub fn restore(&mut self, m: Measurement) {
        let key = (m.digest.clone(), m.device_kind.clone());
        self.written_at.insert(key.clone(), m.measured_at_ms);
        self.by_key.insert(key, m);
    }

    /// Folds a reported measurement in; the store writes due (its own, and the removal of the
    /// oldest one past the bound).
    pub fn record(&mut self, m: Measurement) -> Vec<StoreOp> {
        if let Err(why) = sane(&m) {
            warn!(digest = %m.digest.chars().take(80).collect::<String>(), "a measurement refused: {why}");
            return Vec::new();
        }
        let key = (m.digest.clone(), m.device_kind.clone());
        let (changed_memory, merged) = match self.by_key.get(&key) {
            Some(old) => {
                let mut merged = old.clone();
                merged.merge(m);
                (merged.measured != old.measured || merged.sources != old.sources, merged)
            }
            None => {
                info!(
                    model = %m.model,
                    device_kind = %m.device_kind,
                    measured_bytes = m.measured_total(),
                    estimated_bytes = m.estimated.total(),
                    "a new measurement"
                );
                (true, m)
            }
        };
        let at = merged.measured_at_ms;
        let last = self.written_at.get(&key).copied();
        let due = changed_memory || last.is_none_or(|w| at >= w.saturating_add(SPEED_WRITE_MS));
        let mut ops: Vec<StoreOp> =
            due.then(|| StoreOp::Put(store_key(&key.0, &key.1), to_json(&merged))).into_iter().collect();
        if due {
            self.written_at.insert(key.clone(), at);
        }
        self.by_key.insert(key, merged);
        if self.by_key.len() > MAX_MEASUREMENTS {
            let oldest = self.by_key.iter().min_by_key(|(_, m)| m.measured_at_ms).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                warn!(digest = %k.0, device_kind = %k.1, "dropping the oldest measurement (at the bound)");
                self.by_key.remove(&k);
                self.written_at.remove(&k);
                ops.push(StoreOp::Delete(store_key(&k.0, &k.1)));
            }
        }
        ops
    }

    pub fn all(&self) -> impl Iterator<Item = &Measurement> {
        self.by_key.values()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The measurements of the model a source (or catalog id) names.
    pub fn of(&self, source: &str) -> Vec<&Measurement> {
        self.by_key.values().filter(|m| m.is_of(source)).collect()
    }

    /// The calibration learned for a device class.
    pub fn calibration(&self, class: DeviceKind) -> Calibration {
        calibrate(self.by_key.values(), class)
    }
}

impl State {
    /// What the measurements of a deployment's model on devices of `class` say one replica
    /// needs at its options: the largest over the device kinds of that class it was measured on
    /// (a model that took more on one kind is not promised less on another). `None` when it was
    /// never measured on that class (a CPU's figure says nothing of a GPU's CUDA context).
    pub fn measured_need(&self, source: &str, sized: &SizedModel, class: DeviceKind) -> Option<u64> {
        let context = sized.options.context.unwrap_or(sized.spec.context.length);
        self.measurements
            .of(source)
            .iter()
            .filter(|m| m.device_class() == class)
            .map(|m| m.need(context, sized.options.batch))
            .max()
    }

    /// Records the measurements in a load's result or a heartbeat; the store writes due.
    pub fn record_measurements<'a>(
        &mut self,
        reports: impl IntoIterator<Item = &'a pb::ModelMeasurement>,
    ) -> Vec<StoreOp> {
        reports
            .into_iter()
            .flat_map(|p| self.measurements.record(gantry_proto::convert::measurement_from_proto(p)))
            .collect()
    }
}

/// A model's memory for the API: the estimate's terms, and beside them the measurement to show
/// (one of `here`'s device kinds first) with what it implies at `context` × `batch`, its error
/// per term, and the calibration of its device class learned from `all` (of `class` when the
/// model was not measured) applied to the estimate.
pub fn memory_report<'a>(
    estimated: &gantry_core::measured::Terms,
    of_model: &[&Measurement],
    all: impl IntoIterator<Item = &'a Measurement>,
    here: &[String],
    context: u64,
    batch: u64,
    class: DeviceKind,
) -> pb::MeasuredMemory {
    use gantry_proto::convert::{measurement_to_proto, ratios_to_proto, terms_to_proto};
    let mut report = pb::MeasuredMemory {
        source: "estimated".into(),
        estimated: Some(terms_to_proto(estimated)),
        ..Default::default()
    };
    let shown = gantry_core::measured::best_for(of_model, here);
    let calibration = calibrate(all, shown.as_ref().map_or(class, |(m, _)| m.device_class()));
    if calibration.measurements > 0 {
        report.calibration = Some(ratios_to_proto(&calibration.factors));
        report.calibration_measurements = calibration.measurements;
        report.calibrated_bytes = calibration.apply(estimated);
    }
    if let Some((m, provenance)) = shown {
        report.source = provenance.label();
        report.measured_need_bytes = m.need(context, batch);
        report.error_percent = Some(ratios_to_proto(&m.error_percent()));
        report.measurement = Some(measurement_to_proto(m));
    }
    report
}

/// The device class a placement on `nodes` is sized for: CPU when every node's one device is
/// its CPU (a worker without GPUs names it `cpu`), else GPU. Which measurements size a replica
/// (a CPU's figure says nothing of a GPU's CUDA context).
pub fn placement_class(nodes: &[gantry_core::placement::NodeView]) -> DeviceKind {
    if !nodes.is_empty() && nodes.iter().flat_map(|n| &n.gpus).all(|g| g.name == "cpu") {
        DeviceKind::Cpu
    } else {
        DeviceKind::Gpu
    }
}

impl super::Cluster {
    /// The device class the cluster places on: CPU when every worker's one device is its CPU,
    /// else GPU (as placement decides which measurements size a replica).
    pub fn device_class(&self) -> DeviceKind {
        placement_class(&crate::scheduler::nodes(&self.lock().state))
    }

    /// The measurements of a model: those of `digest` when given, else those whose sources or
    /// name match `model` (a source or a catalog id).
    pub fn measurements_of(&self, model: &str, digest: Option<&str>) -> Vec<Measurement> {
        let inner = self.lock();
        match digest {
            Some(d) => inner.state.measurements.all().filter(|m| m.digest == d).cloned().collect(),
            None => inner.state.measurements.of(model).into_iter().cloned().collect(),
        }
    }

    /// Every measurement held.
    pub fn all_measurements(&self) -> Vec<Measurement> {
        self.lock().state.measurements.all().cloned().collect()
    }

    /// The device kinds of the cluster's workers: their GPUs' names, and the kinds their loaded
    /// models were measured on (a CPU worker's `cpu:<model>`). What `measured here` means on a
    /// controller.
    pub fn device_kinds(&self) -> Vec<String> {
        let inner = self.lock();
        let mut kinds: Vec<String> = Vec::new();
        for w in inner.state.workers.values().filter(|w| !w.lost) {
            let gpus = w.status.gpus.iter().filter(|g| g.source == "nvml").map(|g| g.name.clone());
            let measured = w.status.models.iter().filter_map(|m| m.measurement.as_ref()).map(|m| m.device_kind.clone());
            for k in gpus.chain(measured) {
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
        }
        kinds
    }

    /// Records a measurement made outside the cluster (`gantry bench --controller`); how many
    /// are held now.
    pub fn record_measurement(&self, m: &pb::ModelMeasurement) -> usize {
        let mut inner = self.lock();
        let effects = inner.state.record_measurements([m]).into_iter().map(crate::scheduler::Effect::Persist).collect();
        let n = inner.state.measurements.len();
        self.settle(&mut inner, effects);
        n
    }
}
