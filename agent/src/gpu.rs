//! GPUs as NVML sees them: name, memory and utilization, sampled in the
//! background for metrics, adaptive batching and the NodeAgent status.
//! NVML is loaded at run time; without it (no driver, no GPU) the agent says
//! so once and reports no GPUs.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use nvml_wrapper::Nvml;

/// One GPU's reading.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuReading {
    /// NVML index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Device UUID.
    pub uuid: Option<String>,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Used memory in bytes.
    pub memory_used_bytes: u64,
    /// Utilization over the last sample period, 0..1.
    pub utilization: f64,
}

/// The latest readings of every GPU.
#[derive(Debug, Default)]
pub struct GpuMonitor {
    readings: RwLock<Vec<GpuReading>>,
}

fn read_all(nvml: &Nvml) -> Result<Vec<GpuReading>, nvml_wrapper::error::NvmlError> {
    let count = nvml.device_count()?;
    let mut out = Vec::with_capacity(count as usize);
    for index in 0..count {
        let device = nvml.device_by_index(index)?;
        let memory = device.memory_info()?;
        out.push(GpuReading {
            index,
            name: device.name().unwrap_or_default(),
            uuid: device.uuid().ok(),
            memory_total_bytes: memory.total,
            memory_used_bytes: memory.used,
            utilization: device
                .utilization_rates()
                .map(|u| f64::from(u.gpu) / 100.0)
                .unwrap_or(0.0),
        });
    }
    Ok(out)
}

impl GpuMonitor {
    /// Starts sampling every `period` on a background thread when NVML is
    /// available; otherwise logs why once and stays empty.
    pub fn start(period: Duration) -> Arc<Self> {
        let monitor = Arc::new(Self::default());
        let nvml = match Nvml::init() {
            Ok(nvml) => nvml,
            Err(e) => {
                tracing::info!(reason = %e, "NVML is not available: no GPUs reported, the engine runs on the CPU");
                return monitor;
            }
        };
        let weak = Arc::downgrade(&monitor);
        let spawned = std::thread::Builder::new()
            .name("weir-nvml".into())
            .spawn(move || {
                while let Some(monitor) = weak.upgrade() {
                    match read_all(&nvml) {
                        Ok(readings) => {
                            *monitor.readings.write().unwrap_or_else(|p| p.into_inner()) = readings
                        }
                        Err(e) => tracing::warn!(error = %e, "reading GPUs through NVML"),
                    }
                    drop(monitor);
                    std::thread::sleep(period);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the NVML sampler");
        }
        monitor
    }

    /// The latest readings.
    pub fn readings(&self) -> Vec<GpuReading> {
        self.readings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Mean utilization over the GPUs (0..1), or `None` without GPUs.
    pub fn utilization(&self) -> Option<f64> {
        let readings = self.readings.read().unwrap_or_else(|p| p.into_inner());
        (!readings.is_empty())
            .then(|| readings.iter().map(|r| r.utilization).sum::<f64>() / readings.len() as f64)
    }
}
