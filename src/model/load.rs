//! Moving canonical tensors into and out of the burn model by module path.

use std::collections::BTreeSet;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

use crate::weights::{RawTensor, TensorMap};

use super::EfficientNet;

#[derive(Debug, thiserror::Error)]
#[error("weights do not fit the model: {0}")]
pub struct LoadError(pub String);

/// The canonical (PyTorch-named) tensor for a burn parameter path, and whether burn stores it
/// transposed (`Linear` keeps `[in, out]`).
fn canonical(path: &str) -> (String, bool) {
    if let Some(bn) = path.strip_suffix(".gamma") {
        return (format!("{bn}.weight"), false);
    }
    if let Some(bn) = path.strip_suffix(".beta") {
        return (format!("{bn}.bias"), false);
    }
    (path.to_string(), path == "classifier.weight")
}

fn transpose(t: &RawTensor) -> RawTensor {
    let [rows, cols] = [t.shape[0], t.shape[1]];
    let mut data = vec![0.0; t.data.len()];
    for r in 0..rows {
        for c in 0..cols {
            data[c * rows + r] = t.data[r * cols + c];
        }
    }
    RawTensor {
        shape: vec![cols, rows],
        data,
        integer: t.integer,
    }
}

/// A visitor of every float parameter with its module path (`blocks.3.dw.bn.gamma`).
pub trait ParamVisitor {
    fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<D>>);
}

/// A mapper of every float parameter with its module path.
pub trait ParamMapper {
    fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>>;
}

/// Keeps the module path while burn walks a model, for [`ParamVisitor`] and [`ParamMapper`].
struct WithPath<T> {
    path: Vec<String>,
    inner: T,
}

impl<T> WithPath<T> {
    fn enter(&mut self, name: &str) {
        self.path.push(name.to_string());
    }

    fn exit(&mut self) {
        self.path.pop();
    }

    fn joined(&self) -> String {
        self.path.join(".")
    }
}

impl<T: ParamVisitor> ModuleVisitor for WithPath<T> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.joined();
        self.inner.visit(&path, param);
    }
}

impl<T: ParamMapper> ModuleMapper for WithPath<T> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.joined();
        self.inner.map(&path, param)
    }
}

/// Runs `visitor` over every float parameter of `model`; returns it.
pub fn visit_params<M: Module, V: ParamVisitor>(model: &M, visitor: V) -> V {
    let mut v = WithPath {
        path: Vec::new(),
        inner: visitor,
    };
    model.visit(&mut v);
    v.inner
}

/// Runs `mapper` over every float parameter of `model`; returns the model and the mapper.
pub fn map_params<T: Module, M: ParamMapper>(model: T, mapper: M) -> (T, M) {
    let mut m = WithPath {
        path: Vec::new(),
        inner: mapper,
    };
    let model = model.map(&mut m);
    (model, m.inner)
}

struct Loader<'a> {
    tensors: &'a TensorMap,
    used: BTreeSet<String>,
    errors: Vec<String>,
}

impl ParamMapper for Loader<'_> {
    fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (name, transposed) = canonical(path);
        let Some(t) = self.tensors.get(&name) else {
            self.errors.push(format!("missing `{name}`"));
            return param;
        };
        let t = if transposed && t.shape.len() == 2 {
            transpose(t)
        } else {
            t.clone()
        };
        let expected = param.lazy_shape().dims::<D>().to_vec();
        if t.shape != expected {
            self.errors.push(format!(
                "`{name}` is {:?}, the model needs {expected:?}",
                t.shape
            ));
            return param;
        }
        self.used.insert(name);
        let device = param.lazy_device();
        param.map(|old| {
            let new = Tensor::from_data(TensorData::new(t.data, t.shape), &device);
            // Keep trainability: loaded weights on an autodiff device must still get gradients.
            if old.is_require_grad() {
                new.require_grad()
            } else {
                new
            }
        })
    }
}

/// Replaces every parameter and BN statistic of `model` with the canonical tensors in `tensors`.
/// Every model tensor must be present with the right shape, and every given tensor must be used.
pub fn apply_weights(model: EfficientNet, tensors: &TensorMap) -> Result<EfficientNet, LoadError> {
    let loader = Loader {
        tensors,
        used: BTreeSet::new(),
        errors: Vec::new(),
    };
    let (model, mut loader) = map_params(model, loader);
    let unused: Vec<&String> = tensors
        .keys()
        .filter(|k| !loader.used.contains(*k))
        .collect();
    if let Some(k) = unused.first() {
        loader
            .errors
            .push(format!("unused `{k}` ({} unused in all)", unused.len()));
    }
    if loader.errors.is_empty() {
        Ok(model)
    } else {
        let n = loader.errors.len();
        let shown = loader
            .errors
            .into_iter()
            .take(3)
            .collect::<Vec<_>>()
            .join("; ");
        Err(LoadError(format!("{shown} ({n} problems)")))
    }
}

struct Exporter(TensorMap);

impl ParamVisitor for Exporter {
    fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<D>>) {
        let (name, transposed) = canonical(path);
        let data = param.val().into_data().convert::<f32>();
        let t = RawTensor {
            shape: data.shape().to_vec(),
            data: data.try_to_vec::<f32>().expect("float tensor"),
            integer: false,
        };
        let t = if transposed { transpose(&t) } else { t };
        self.0.insert(name, t);
    }
}

/// Every parameter and BN statistic of `model` under its canonical name.
pub fn export_weights(model: &EfficientNet) -> TensorMap {
    // `valid()` synchronises BN running statistics; visiting directly may see them one update late.
    visit_params(&model.valid(), Exporter(TensorMap::new())).0
}
