//! Which device burn computes on, named as on the command line: `cpu` (burn's Flex backend, always
//! built), `wgpu[:KIND]` and `vulkan[:KIND]` (cargo feature `wgpu` / `vulkan`; KIND is `cpu` for a
//! software adapter such as Mesa's lavapipe, `N` for the N-th discrete GPU, `integrated[N]`, or
//! omitted for wgpu's own choice) and `cuda[:N]` (cargo feature `cuda`).
//!
//! A device that the build lacks, or that the machine lacks, is a one-line error before any work
//! starts: [`DeviceChoice::open`] runs one tiny operation on it and turns burn's panic into an error.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{Device, Tensor};

/// What a wgpu-style device string selects (burn's `DeviceKind`, spelled for a command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// wgpu's own pick (a high-power GPU first).
    Default,
    /// A software adapter (lavapipe on Linux).
    Cpu,
    Discrete(usize),
    Integrated(usize),
}

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
    Wgpu(AdapterKind),
    Vulkan(AdapterKind),
}

const DEVICE_HELP: &str =
    "use cpu, cuda[:N], wgpu[:cpu|N|integratedN] or vulkan[:cpu|N|integratedN]";

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let (name, arg) = match lower.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (lower.as_str(), None),
        };
        let bad = || format!("unknown device `{s}`: {DEVICE_HELP}");
        let index = |a: &str| a.parse::<usize>().map_err(|_| bad());
        let adapter = |a: Option<&str>| -> Result<AdapterKind, String> {
            Ok(match a {
                None | Some("default") => AdapterKind::Default,
                Some("cpu") => AdapterKind::Cpu,
                Some(a) => match a.strip_prefix("integrated") {
                    Some("") => AdapterKind::Integrated(0),
                    Some(i) => AdapterKind::Integrated(index(i)?),
                    None => AdapterKind::Discrete(index(a)?),
                },
            })
        };
        Ok(match (name, arg) {
            ("cpu" | "flex", None) => DeviceChoice::Cpu,
            ("cuda", None) => DeviceChoice::Cuda(0),
            ("cuda", Some(i)) => DeviceChoice::Cuda(index(i)?),
            ("wgpu", a) => DeviceChoice::Wgpu(adapter(a)?),
            ("vulkan", a) => DeviceChoice::Vulkan(adapter(a)?),
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let adapter = |k: &AdapterKind| match k {
            AdapterKind::Default => String::new(),
            AdapterKind::Cpu => ":cpu".into(),
            AdapterKind::Discrete(i) => format!(":{i}"),
            AdapterKind::Integrated(i) => format!(":integrated{i}"),
        };
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceChoice::Wgpu(k) => write!(f, "wgpu{}", adapter(k)),
            DeviceChoice::Vulkan(k) => write!(f, "vulkan{}", adapter(k)),
        }
    }
}

/// A `--devices` value: several devices, comma-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList(pub Vec<DeviceChoice>);

impl FromStr for DeviceList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_device_list(s).map(DeviceList)
    }
}

/// Parses a comma-separated `--devices` list (each entry as `--device`; duplicates refused).
pub fn parse_device_list(s: &str) -> Result<Vec<DeviceChoice>, String> {
    let devices = s
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<DeviceChoice>, _>>()?;
    for (i, d) in devices.iter().enumerate() {
        if devices[..i].contains(d) {
            return Err(format!("device `{d}` is listed twice"));
        }
    }
    Ok(devices)
}

impl DeviceChoice {
    pub fn is_cpu(&self) -> bool {
        matches!(self, DeviceChoice::Cpu)
    }

    /// burn's device for this choice, checked by running one small operation on it.
    pub fn open(&self) -> anyhow::Result<Device> {
        let device = self.device()?;
        if !self.is_cpu() {
            probe(&device).map_err(|why| {
                anyhow::anyhow!(
                    "device `{self}` is not usable ({why}): no such adapter or no driver{}",
                    match self {
                        DeviceChoice::Cuda(_) => "",
                        _ => "; `vulkaninfo --summary` lists adapters, and Debian's mesa-vulkan-drivers gives a software one (wgpu:cpu)",
                    }
                )
            })?;
        }
        Ok(device)
    }

    fn device(&self) -> anyhow::Result<Device> {
        // Unused in a build with every GPU feature.
        #[cfg(not(all(feature = "cuda", feature = "wgpu", feature = "vulkan")))]
        let missing = |feature: &str| {
            anyhow::anyhow!(
                "device `{self}` needs effnet built with `--features {feature}` (this build has {})",
                built_devices().join(", ")
            )
        };
        Ok(match *self {
            DeviceChoice::Cpu => Device::flex(),
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda(i) => {
                match cuda_devices()? {
                    0 => anyhow::bail!(
                        "device `{self}` is not usable: no CUDA device found (no NVIDIA driver \
                         loaded, or no GPU)"
                    ),
                    count if i >= count => anyhow::bail!(
                        "device `{self}` does not exist: this machine has {count} CUDA device(s)"
                    ),
                    _ => {}
                }
                Device::cuda(i)
            }
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda(_) => return Err(missing("cuda")),
            #[cfg(feature = "wgpu")]
            DeviceChoice::Wgpu(k) => Device::wgpu(kind(k)),
            #[cfg(not(feature = "wgpu"))]
            DeviceChoice::Wgpu(_) => return Err(missing("wgpu")),
            #[cfg(feature = "vulkan")]
            DeviceChoice::Vulkan(k) => Device::vulkan(kind(k)),
            #[cfg(not(feature = "vulkan"))]
            DeviceChoice::Vulkan(_) => return Err(missing("vulkan")),
        })
    }
}

/// The device kinds this build can open.
pub fn built_devices() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(feature = "vulkan") {
        v.push("vulkan");
    }
    v
}

#[cfg(any(feature = "wgpu", feature = "vulkan"))]
fn kind(k: AdapterKind) -> burn::tensor::DeviceKind {
    use burn::tensor::DeviceKind;
    match k {
        AdapterKind::Default => DeviceKind::DefaultDevice,
        AdapterKind::Cpu => DeviceKind::Cpu,
        AdapterKind::Discrete(i) => DeviceKind::DiscreteGpu(i),
        AdapterKind::Integrated(i) => DeviceKind::IntegratedGpu(i),
    }
}

/// How many CUDA devices the driver reports (0 without a driver).
#[cfg(feature = "cuda")]
fn cuda_devices() -> anyhow::Result<usize> {
    quiet_panics(|| burn::tensor::Device::enumerate(burn::tensor::DeviceType::Cuda).len())
        .map_err(|why| anyhow::anyhow!("no CUDA driver: {why}"))
}

/// Runs one add and a read-back on `device`; burn panics when the adapter or driver is missing.
fn probe(device: &Device) -> Result<(), String> {
    let device = device.clone();
    quiet_panics(move || {
        let x = Tensor::<1>::from_floats([1.0, 2.0], &device);
        (x.clone() + x)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default()
    })
    .and_then(|v| {
        if v == [2.0, 4.0] {
            Ok(())
        } else {
            Err(format!("a test addition returned {v:?}"))
        }
    })
}

/// Runs `f`, turning a panic into its message without printing it (burn reports a device that
/// fails, or runs out of memory, by panicking).
pub fn quiet_panics<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    out.map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the backend panicked".into())
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse_and_print_back() {
        for (s, d) in [
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
            ("wgpu", DeviceChoice::Wgpu(AdapterKind::Default)),
            ("wgpu:cpu", DeviceChoice::Wgpu(AdapterKind::Cpu)),
            ("vulkan:1", DeviceChoice::Vulkan(AdapterKind::Discrete(1))),
            (
                "wgpu:integrated2",
                DeviceChoice::Wgpu(AdapterKind::Integrated(2)),
            ),
        ] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), d, "{s}");
            assert_eq!(d.to_string().parse::<DeviceChoice>().unwrap(), d);
        }
        for bad in ["gpu", "cuda:x", "cuda:-1", "cpu:0", "wgpu:fast", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.contains("unknown device"), "{bad}: {e}");
        }
        assert_eq!(
            parse_device_list("cuda:0,cuda:1").unwrap(),
            vec![DeviceChoice::Cuda(0), DeviceChoice::Cuda(1)]
        );
        assert!(
            parse_device_list("cuda:0,cuda:0")
                .unwrap_err()
                .contains("twice")
        );
    }

    #[test]
    fn devices_missing_from_the_build_are_one_line_errors() {
        if !cfg!(feature = "cuda") {
            let e = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
            assert!(!e.contains('\n'));
        }
        if !cfg!(feature = "wgpu") {
            let e = DeviceChoice::Wgpu(AdapterKind::Cpu)
                .open()
                .unwrap_err()
                .to_string();
            assert!(e.contains("--features wgpu"), "{e}");
        }
        assert!(DeviceChoice::Cpu.open().is_ok());
    }
}
