//! PyTorch checkpoint reader: the zip format (torch >= 1.6) and the legacy stream format, with
//! storage offsets, strided (non-contiguous) views and half/bfloat16/double storages.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::pickle::{self, Value};
use super::{RawTensor, TensorMap, WeightError};

/// torch's legacy-format magic number, 0x1950a86a20f9469cfc6c, as pickle's little-endian bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

#[derive(Debug, Clone, Copy, PartialEq)]
enum DType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
    fn to_f32(self, bytes: &[u8]) -> Vec<f32> {
        let n = self.size();
        let chunks = bytes.chunks_exact(n);
        match self {
            DType::F32 => chunks
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::F64 => chunks
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::F16 => chunks
                .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            DType::BF16 => chunks
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            DType::I64 => chunks
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::I32 => chunks
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::I16 => chunks
                .map(|c| i16::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::I8 => chunks.map(|c| c[0] as i8 as f32).collect(),
            DType::U8 | DType::Bool => chunks.map(|c| c[0] as f32).collect(),
        }
    }
}

/// A tensor as the pickle describes it, before its storage is read.
#[derive(Debug, Clone)]
struct TensorRef {
    storage: String,
    dtype: DType,
    /// Legacy storages may be views into a root storage: (root key, element offset).
    root: Option<(String, usize)>,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// Reads a `.pth` / `.pt` / `.bin` state dict in either serialization format.
pub fn read(path: &Path) -> Result<TensorMap, WeightError> {
    let bytes = std::fs::read(path).map_err(|e| WeightError::io(path, e))?;
    let corrupt = |why: String| WeightError::Corrupt {
        path: path.display().to_string(),
        why,
    };
    if bytes.starts_with(b"PK\x03\x04") {
        read_zip(&bytes).map_err(corrupt)
    } else if bytes.starts_with(b"\x80\x02\x8a\x0a") && bytes.get(4..14) == Some(&LEGACY_MAGIC[..])
    {
        read_legacy(&bytes).map_err(corrupt)
    } else {
        Err(WeightError::NotACheckpoint {
            path: path.display().to_string(),
            why: "neither a PyTorch zip archive nor a legacy torch.save stream".into(),
        })
    }
}

fn read_zip(bytes: &[u8]) -> Result<TensorMap, String> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("bad zip archive: {e}"))?;
    let pkl_name = archive
        .file_names()
        .find(|n| n.ends_with("data.pkl"))
        .map(str::to_string)
        .ok_or("zip archive has no data.pkl")?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut f) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        f.read_to_string(&mut order).map_err(|e| e.to_string())?;
        if order.trim() != "little" {
            return Err(format!("byte order `{}` is not supported", order.trim()));
        }
    }
    let pkl = read_entry(&mut archive, &pkl_name)?;
    let (root, _) = pickle::load(&pkl).map_err(|e| e.to_string())?;
    let refs = state_dict(&root)?;
    let mut storages: HashMap<String, Vec<f32>> = HashMap::new();
    for (_, r) in &refs {
        if !storages.contains_key(&r.storage) {
            let raw = read_entry(&mut archive, &format!("{prefix}data/{}", r.storage))?;
            storages.insert(r.storage.clone(), r.dtype.to_f32(&raw));
        }
    }
    materialize(refs, &storages)
}

fn read_entry(
    archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    name: &str,
) -> Result<Vec<u8>, String> {
    let mut f = archive
        .by_name(name)
        .map_err(|e| format!("missing archive entry `{name}`: {e}"))?;
    let mut out = Vec::with_capacity(f.size() as usize);
    f.read_to_end(&mut out)
        .map_err(|e| format!("cannot read archive entry `{name}`: {e}"))?;
    Ok(out)
}

fn read_legacy(bytes: &[u8]) -> Result<TensorMap, String> {
    let mut pos = 0;
    let mut next = |what: &str| -> Result<Value, String> {
        let (v, used) = pickle::load(&bytes[pos..]).map_err(|e| format!("{what}: {e}"))?;
        pos += used;
        Ok(v)
    };
    next("magic number")?;
    let protocol = next("protocol version")?;
    if protocol.as_int() != Some(1001) {
        return Err(format!("unsupported legacy protocol {protocol:?}"));
    }
    next("system info")?;
    let root = next("state dict")?;
    let keys = next("storage keys")?;
    let refs = state_dict(&root)?;
    let mut dtypes: HashMap<&str, DType> = HashMap::new();
    for (_, r) in &refs {
        let root_key = r
            .root
            .as_ref()
            .map_or(r.storage.as_str(), |(k, _)| k.as_str());
        dtypes.insert(root_key, r.dtype);
    }
    let mut storages: HashMap<String, Vec<f32>> = HashMap::new();
    for key in keys.as_seq().ok_or("storage key list is not a list")? {
        let key = key.as_str().ok_or("storage key is not a string")?;
        let dtype = *dtypes
            .get(key)
            .ok_or_else(|| format!("storage `{key}` is not used by any tensor"))?;
        let header = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| format!("file ends before storage `{key}` (truncated?)"))?;
        let numel = u64::from_le_bytes(header.try_into().unwrap()) as usize;
        pos += 8;
        let len = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| format!("storage `{key}` has an absurd size"))?;
        let data = bytes
            .get(pos..pos + len)
            .ok_or_else(|| format!("file ends inside storage `{key}` (truncated?)"))?;
        pos += len;
        storages.insert(key.to_string(), dtype.to_f32(data));
    }
    // Views into a root storage become offsets into it.
    let refs = refs
        .into_iter()
        .map(|(name, mut r)| {
            if let Some((root, view_offset)) = r.root.take() {
                r.storage = root;
                r.offset += view_offset;
            }
            (name, r)
        })
        .collect();
    materialize(refs, &storages)
}

/// Finds the tensor dictionary: the top-level dict, or a nested `state_dict` / `model` entry
/// (training checkpoints; the EMA copy is preferred when present, as timm does).
fn state_dict(root: &Value) -> Result<Vec<(String, TensorRef)>, String> {
    let Value::Dict(items) = root else {
        return Err("the checkpoint is not a dictionary of tensors".into());
    };
    for nested in ["state_dict_ema", "model_ema", "state_dict", "model"] {
        if let Some((_, v @ Value::Dict(_))) =
            items.iter().find(|(k, _)| k.as_str() == Some(nested))
        {
            return state_dict(v);
        }
    }
    let mut out = Vec::new();
    for (k, v) in items {
        let Some(name) = k.as_str() else { continue };
        if let Some(t) = tensor_ref(v)? {
            let name = name.strip_prefix("module.").unwrap_or(name);
            out.push((name.to_string(), t));
        }
    }
    if out.is_empty() {
        return Err("the checkpoint holds no tensors".into());
    }
    Ok(out)
}

fn tensor_ref(v: &Value) -> Result<Option<TensorRef>, String> {
    let Value::Object { callable, args, .. } = v else {
        return Ok(None);
    };
    let args = args.as_seq().unwrap_or(&[]);
    match callable.global_name() {
        Some(("torch._utils", "_rebuild_parameter")) => match args.first() {
            Some(inner) => tensor_ref(inner),
            None => Err("_rebuild_parameter without a tensor".into()),
        },
        Some(("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor")) => {
            let [storage, offset, size, stride, ..] = args else {
                return Err("_rebuild_tensor with too few arguments".into());
            };
            let Value::Persistent(pid) = storage else {
                return Err("tensor storage is not a persistent id".into());
            };
            let pid = pid.as_seq().ok_or("storage id is not a tuple")?;
            let [_tag, kind, key, _location, _numel, rest @ ..] = pid else {
                return Err("storage id has too few fields".into());
            };
            let (_, type_name) = kind.global_name().ok_or("storage type is not a class")?;
            let dtype = DType::from_storage(type_name)
                .ok_or_else(|| format!("unsupported storage type `{type_name}`"))?;
            let key = key
                .as_str()
                .ok_or("storage key is not a string")?
                .to_string();
            // Legacy view metadata: (view_key, offset, size).
            let (storage, root) = match rest.first().and_then(Value::as_seq) {
                Some([view_key, view_offset, _]) => (
                    view_key.as_str().ok_or("bad view key")?.to_string(),
                    Some((key, view_offset.as_int().ok_or("bad view offset")? as usize)),
                ),
                _ => (key, None),
            };
            let ints = |v: &Value, what: &str| -> Result<Vec<usize>, String> {
                v.as_seq()
                    .ok_or_else(|| format!("tensor {what} is not a tuple"))?
                    .iter()
                    .map(|x| {
                        x.as_int()
                            .filter(|&i| i >= 0)
                            .map(|i| i as usize)
                            .ok_or_else(|| format!("bad tensor {what}"))
                    })
                    .collect()
            };
            let shape = ints(size, "size")?;
            let strides = ints(stride, "stride")?;
            if shape.len() != strides.len() {
                return Err("tensor size and stride differ in rank".into());
            }
            Ok(Some(TensorRef {
                storage,
                dtype,
                root,
                offset: offset
                    .as_int()
                    .filter(|&o| o >= 0)
                    .ok_or("bad storage offset")? as usize,
                shape,
                strides,
            }))
        }
        _ => Ok(None),
    }
}

/// Gathers every tensor from its storage, honouring offset and strides.
fn materialize(
    refs: Vec<(String, TensorRef)>,
    storages: &HashMap<String, Vec<f32>>,
) -> Result<TensorMap, String> {
    let mut out = TensorMap::new();
    for (name, r) in refs {
        let storage = storages
            .get(&r.storage)
            .ok_or_else(|| format!("`{name}`: storage `{}` is missing", r.storage))?;
        let numel: usize = r.shape.iter().product();
        if numel > 0 {
            let last = r.offset
                + r.shape
                    .iter()
                    .zip(&r.strides)
                    .map(|(s, st)| (s - 1) * st)
                    .sum::<usize>();
            if last >= storage.len() {
                return Err(format!(
                    "`{name}`: view reaches element {last} of a {}-element storage (truncated?)",
                    storage.len()
                ));
            }
        }
        let mut data = Vec::with_capacity(numel);
        let mut index = vec![0usize; r.shape.len()];
        for _ in 0..numel {
            let at = r.offset
                + index
                    .iter()
                    .zip(&r.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            data.push(storage[at]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < r.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out.insert(
            name,
            RawTensor {
                shape: r.shape,
                data,
                integer: matches!(
                    r.dtype,
                    DType::I64 | DType::I32 | DType::I16 | DType::I8 | DType::U8 | DType::Bool
                ),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    /// `tests/data/views_*.pth` come from `scripts/make_torch_fixtures.py`: a transposed view at a
    /// storage offset, a strided half-precision view, and a second view of a shared storage, nested
    /// under `state_dict` with DataParallel's `module.` prefix.
    #[test]
    fn offsets_strides_shared_storages_and_half_in_both_formats() {
        for file in ["views_zip.pth", "views_legacy.pth"] {
            let t = read(&fixture(file)).unwrap();
            assert_eq!(t.len(), 3, "{file}");
            assert_eq!(t["a"].shape, vec![2, 3]);
            assert_eq!(t["a"].data, vec![4.0, 6.0, 8.0, 5.0, 7.0, 9.0], "{file}");
            assert_eq!(t["b"].data, vec![0.5, 1.5, 2.5, 3.5], "{file}");
            assert_eq!(t["c"].data, vec![0.0, 1.0, 2.0], "{file}");
        }
    }

    #[test]
    fn truncation_is_reported_not_panicked() {
        for file in ["views_zip.pth", "views_legacy.pth"] {
            let bytes = std::fs::read(fixture(file)).unwrap();
            let dir = tempfile::tempdir().unwrap();
            for cut in [bytes.len() - 3, bytes.len() / 2, 20] {
                let p = dir.path().join("cut.pth");
                std::fs::write(&p, &bytes[..cut]).unwrap();
                let err = read(&p).unwrap_err().to_string();
                assert!(
                    err.contains("corrupt or truncated") || err.contains("not a weights file"),
                    "{file} cut {cut}: {err}"
                );
            }
        }
    }
}
