//! `--device` values: `cpu` (or `cpu:N`; every CPU index is the same candle device here) and
//! `cuda:N`, which only opens in a binary built with the `cuda` feature.

use std::fmt;
use std::str::FromStr;

#[cfg(feature = "cuda")]
use anyhow::Context;
use candle_core::Device;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu(usize),
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, index) = match s.split_once(':') {
            Some((kind, index)) => {
                let index = index
                    .parse()
                    .map_err(|_| format!("device index {index:?} is not a non-negative integer"))?;
                (kind, index)
            }
            None => (s, 0),
        };
        match kind {
            "cpu" => Ok(DeviceSpec::Cpu(index)),
            "cuda" => Ok(DeviceSpec::Cuda(index)),
            _ => Err(format!("unknown device {s:?} (expected cpu, cpu:N or cuda:N)")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu(i) => write!(f, "cpu:{i}"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the candle device.
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            DeviceSpec::Cpu(_) => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(i) => Device::new_cuda(i).with_context(|| format!("opening device {self}")),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(i) => {
                let msg = tandem_actors::DeviceId::Cuda(i).check_built().unwrap_err();
                crate::error::bad_input!("--device: {msg}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu(0)));
        assert_eq!("cpu:1".parse(), Ok(DeviceSpec::Cpu(1)));
        assert_eq!("cuda:2".parse(), Ok(DeviceSpec::Cuda(2)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_bad_input() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err();
        assert_eq!(crate::error::exit_code(&err), crate::error::EXIT_BAD_INPUT);
        assert!(format!("{err:#}").contains("--features cuda"), "{err:#}");
    }
}
