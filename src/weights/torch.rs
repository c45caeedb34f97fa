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

/// How many values a file may make: its tensors are views into storages the file holds, so
/// together they can only exceed the file's size in elements by sharing storage. Counting every
/// decoded storage and every gathered element against this keeps memory within a fixed multiple
/// of the file size, whatever the file claims.
struct Budget {
    left: usize,
}

impl Budget {
    fn for_file(bytes: usize) -> Self {
        Budget {
            left: bytes.max(1 << 16),
        }
    }

    fn spend(&mut self, elements: usize, what: &str) -> Result<(), String> {
        self.left = self.left.checked_sub(elements).ok_or_else(|| {
            format!("{what} holds {elements} elements, more than the file can hold")
        })?;
        Ok(())
    }
}

/// Reads a `.pth` / `.pt` / `.bin` state dict in either serialization format.
pub fn read(path: &Path) -> Result<TensorMap, WeightError> {
    let bytes = super::read_file(path)?;
    let corrupt = |why: String| WeightError::Corrupt {
        path: path.display().to_string(),
        why,
    };
    let mut budget = Budget::for_file(bytes.len());
    if bytes.starts_with(b"PK\x03\x04") {
        read_zip(&bytes, &mut budget).map_err(corrupt)
    } else if bytes.starts_with(b"\x80\x02\x8a\x0a") && bytes.get(4..14) == Some(&LEGACY_MAGIC[..])
    {
        read_legacy(&bytes, &mut budget).map_err(corrupt)
    } else {
        Err(WeightError::NotACheckpoint {
            path: path.display().to_string(),
            why: "neither a PyTorch zip archive nor a legacy torch.save stream".into(),
        })
    }
}

fn read_zip(bytes: &[u8], budget: &mut Budget) -> Result<TensorMap, String> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("bad zip archive: {e}"))?;
    let pkl_name = archive
        .file_names()
        .find(|n| n.ends_with("data.pkl"))
        .map(str::to_string)
        .ok_or("zip archive has no data.pkl")?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if archive.by_name(&format!("{prefix}byteorder")).is_ok() {
        let bytes = read_entry(&mut archive, &format!("{prefix}byteorder"), 16)?;
        let order = String::from_utf8_lossy(&bytes);
        if order.trim() != "little" {
            return Err(format!(
                "byte order `{}` is not supported",
                quote(order.trim())
            ));
        }
    }
    let pkl = read_entry(&mut archive, &pkl_name, bytes.len())?;
    let (root, _) = pickle::load(&pkl).map_err(|e| e.to_string())?;
    let refs = state_dict(&root)?;
    let mut storages: HashMap<String, Vec<f32>> = HashMap::new();
    for (_, r) in &refs {
        if !storages.contains_key(&r.storage) {
            let raw = read_entry(
                &mut archive,
                &format!("{prefix}data/{}", r.storage),
                bytes.len(),
            )?;
            let what = format!("storage `{}`", quote(&r.storage));
            budget.spend(raw.len() / r.dtype.size(), &what)?;
            storages.insert(r.storage.clone(), r.dtype.to_f32(&raw));
        }
    }
    materialize(refs, &storages, budget)
}

/// Archive entry `name`, read to exactly the size its header promises; that size may not exceed
/// `limit` (PyTorch stores entries uncompressed, so no entry is larger than the archive).
fn read_entry(
    archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    name: &str,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let f = archive
        .by_name(name)
        .map_err(|e| format!("missing archive entry `{}`: {e}", quote(name)))?;
    let size = f.size();
    if size > limit as u64 {
        return Err(format!(
            "archive entry `{}` claims {size} bytes, more than the {limit}-byte file holds",
            quote(name)
        ));
    }
    let mut out = Vec::with_capacity(size as usize);
    f.take(size + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read archive entry `{}`: {e}", quote(name)))?;
    if out.len() as u64 != size {
        return Err(format!(
            "archive entry `{}` holds {} bytes, not the {size} its header says",
            quote(name),
            out.len()
        ));
    }
    Ok(out)
}

fn quote(s: &str) -> String {
    crate::util::quote_for_message(s)
}

fn read_legacy(bytes: &[u8], budget: &mut Budget) -> Result<TensorMap, String> {
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
            .ok_or_else(|| format!("storage `{}` is not used by any tensor", quote(key)))?;
        let truncated = || format!("file ends inside storage `{}` (truncated?)", quote(key));
        let header = bytes
            .get(pos..pos.saturating_add(8))
            .ok_or_else(truncated)?;
        let numel = u64::from_le_bytes(header.try_into().expect("8 bytes"));
        pos += 8;
        let len = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(dtype.size()))
            .filter(|&len| len <= bytes.len() - pos)
            .ok_or_else(truncated)?;
        let data = &bytes[pos..pos + len];
        pos += len;
        budget.spend(len / dtype.size(), &format!("storage `{}`", quote(key)))?;
        storages.insert(key.to_string(), dtype.to_f32(data));
    }
    // Views into a root storage become offsets into it.
    let refs = refs
        .into_iter()
        .map(|(name, mut r)| {
            if let Some((root, view_offset)) = r.root.take() {
                r.storage = root;
                r.offset = r
                    .offset
                    .checked_add(view_offset)
                    .ok_or_else(|| format!("`{}`: storage offset overflows", quote(&name)))?;
            }
            Ok((name, r))
        })
        .collect::<Result<_, String>>()?;
    materialize(refs, &storages, budget)
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
                Some([view_key, view_offset, _]) => {
                    let offset = view_offset
                        .as_int()
                        .and_then(|o| usize::try_from(o).ok())
                        .ok_or("bad view offset (not a non-negative integer)")?;
                    let view_key = view_key.as_str().ok_or("bad view key")?.to_string();
                    (view_key, Some((key, offset)))
                }
                _ => (key, None),
            };
            let ints = |v: &Value, what: &str| -> Result<Vec<usize>, String> {
                v.as_seq()
                    .ok_or_else(|| format!("tensor {what} is not a tuple"))?
                    .iter()
                    .map(|x| {
                        x.as_int()
                            .and_then(|i| usize::try_from(i).ok())
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
                    .and_then(|o| usize::try_from(o).ok())
                    .ok_or("bad storage offset")?,
                shape,
                strides,
            }))
        }
        _ => Ok(None),
    }
}

/// Gathers every tensor from its storage, honouring offset and strides; every count is checked
/// before anything is allocated.
fn materialize(
    refs: Vec<(String, TensorRef)>,
    storages: &HashMap<String, Vec<f32>>,
    budget: &mut Budget,
) -> Result<TensorMap, String> {
    let mut out = TensorMap::new();
    for (name, r) in refs {
        let name_q = quote(&name);
        let storage = storages
            .get(&r.storage)
            .ok_or_else(|| format!("`{name_q}`: storage `{}` is missing", quote(&r.storage)))?;
        let absurd = || format!("`{name_q}`: its shape and strides overflow");
        let numel = r
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(absurd)?;
        if numel > 0 {
            let reach = r
                .shape
                .iter()
                .zip(&r.strides)
                .try_fold(r.offset, |acc, (&s, &st)| {
                    acc.checked_add((s - 1).checked_mul(st)?)
                })
                .ok_or_else(absurd)?;
            if reach >= storage.len() {
                return Err(format!(
                    "`{name_q}`: view reaches element {reach} of a {}-element storage (truncated?)",
                    storage.len()
                ));
            }
        }
        budget.spend(numel, &format!("tensor `{name_q}`"))?;
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
