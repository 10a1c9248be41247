//! `--device cpu|cuda:N|auto`: picks the expert backend at start.

use std::sync::Arc;

use super::checkpoint::WeightSource;
use super::compute::ExpertLoader;
use super::cpu::CpuLoader;
use super::cuda::{cuda_available, CudaDevice, CudaLoader};

/// A parsed `--device` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// `cuda:0` if a CUDA driver loads and sees a device, else `cpu`.
    Auto,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "--device {other:?}: expected cpu, cuda, cuda:N (N a device index) or auto"
                )),
            },
        }
    }
}

impl DeviceSpec {
    /// Resolves `auto` against what this machine has.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if cuda_available() => Self::Cuda(0),
            Self::Auto => Self::Cpu,
            other => other,
        }
    }
}

/// The loader for a `--device` value over a weight source (usually a `Checkpoint`).
pub fn loader_for_device(
    spec: &str,
    source: Arc<dyn WeightSource>,
) -> anyhow::Result<Arc<dyn ExpertLoader>> {
    let parsed: DeviceSpec = spec.parse().map_err(anyhow::Error::msg)?;
    match parsed.resolve() {
        DeviceSpec::Cuda(n) => {
            let dev = CudaDevice::new(n)?;
            tracing::info!(device = %format!("cuda:{n}"), name = %dev.name(), arch = dev.arch(), "expert backend");
            Ok(Arc::new(CudaLoader::new(dev, source)))
        }
        _ => {
            if parsed == DeviceSpec::Auto {
                tracing::info!("no CUDA driver with a device: using the CPU expert backend");
            }
            Ok(Arc::new(CpuLoader::new(source)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        let e = "gpu0".parse::<DeviceSpec>().unwrap_err();
        assert!(e.contains("cuda:N"), "{e}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        // auto resolves to one of the concrete backends, matching what the machine has.
        let r = DeviceSpec::Auto.resolve();
        assert_eq!(r == DeviceSpec::Cuda(0), cuda_available());
    }

    #[test]
    fn cpu_and_auto_loaders_load() {
        let dir = tempfile::tempdir().unwrap();
        let shape = crate::plan::model::ModelShape {
            layers: 1,
            first_moe_layer: 0,
            experts: 2,
            top_k: 1,
            hidden_size: 64,
            expert_intermediate_size: 32,
            dtype: crate::plan::model::Dtype::Bf16,
        };
        crate::worker::checkpoint::write_synthetic_checkpoint(
            dir.path(),
            crate::worker::checkpoint::Family::Mixtral,
            &shape,
            1,
            0,
            false,
        )
        .unwrap();
        let ck: Arc<dyn WeightSource> =
            Arc::new(crate::worker::checkpoint::Checkpoint::open(dir.path()).unwrap());
        let set = loader_for_device("cpu", ck.clone())
            .unwrap()
            .load(&[(0, 1)], None)
            .unwrap();
        assert_eq!(set.backend(), "cpu");
        let set = loader_for_device("auto", ck.clone())
            .unwrap()
            .load(&[(0, 1)], None)
            .unwrap();
        assert_eq!(
            set.backend(),
            if cuda_available() { "cuda:0" } else { "cpu" }
        );
        if !cuda_available() {
            let e = loader_for_device("cuda:0", ck).err().unwrap().to_string();
            assert!(e.contains("--device cpu"), "{e}");
        }
    }
}
