//! `event` inside a script: a handle on the payload, converted field by field.

use std::sync::{Arc, Mutex};

use conflux_api::sonic_rs::{JsonContainerTrait, JsonValueMutTrait, JsonValueTrait};
use conflux_api::Value;
use rhai::{Array, Dynamic, ImmutableString, Map, StaticVec};

/// A path into a shared payload. Objects read through a handle come back as
/// handles (no copy); scalars and arrays come back as script values.
/// Paths up to three deep stay inline, and their segments are the script's
/// own property names, so making a handle allocates nothing but its box.
#[derive(Clone)]
pub struct EventHandle {
    root: Arc<Mutex<Value>>,
    path: StaticVec<ImmutableString>,
}

impl EventHandle {
    pub fn new(root: Arc<Mutex<Value>>) -> Self {
        EventHandle { root, path: StaticVec::new() }
    }

    fn is_root_of(&self, root: &Arc<Mutex<Value>>) -> bool {
        Arc::ptr_eq(&self.root, root) && self.path.is_empty()
    }

    /// Copies out the value this handle points to (null if it no longer exists).
    pub fn value(&self) -> Value {
        let root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        at(&root, &self.path).cloned().unwrap_or_default()
    }

    /// `handle.name` / `handle["name"]`.
    pub fn get(&mut self, name: &ImmutableString) -> Dynamic {
        let root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        let Some(parent) = at(&root, &self.path) else { return Dynamic::UNIT };
        match parent.get(name.as_str()) {
            Some(v) if v.is_object() => {
                let mut path = self.path.clone();
                path.push(name.clone());
                Dynamic::from(EventHandle { root: self.root.clone(), path })
            }
            Some(v) => to_dynamic(v),
            None => Dynamic::UNIT,
        }
    }

    /// `handle.name = value`: writes into the payload, creating objects on the way.
    pub fn set(&mut self, name: &str, value: Dynamic) {
        // Rhai writes a property back after mutating it through a getter;
        // a handle written onto its own place is already there.
        if let Some(h) = value.read_lock::<EventHandle>() {
            if Arc::ptr_eq(&h.root, &self.root)
                && h.path.len() == self.path.len() + 1
                && h.path[..self.path.len()] == self.path[..]
                && h.path.last().map(|s| s.as_str()) == Some(name)
            {
                return;
            }
        }
        let value = to_value(&value);
        let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        let mut target = &mut *root;
        for segment in &self.path {
            if target.get(segment.as_str()).is_none() {
                if !target.is_object() {
                    *target = Value::new_object();
                }
                if let Some(object) = target.as_object_mut() {
                    object.insert(segment.as_str(), Value::new_object());
                }
            }
            target = match target.as_object_mut().and_then(|o| o.get_mut(&segment.as_str())) {
                Some(t) => t,
                None => return,
            };
        }
        if !target.is_object() {
            *target = Value::new_object();
        }
        if let Some(object) = target.as_object_mut() {
            object.insert(name, value);
        }
    }

    /// Whether a field exists (`"name" in event` style checks via `has`).
    pub fn has(&mut self, name: &str) -> bool {
        let root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        at(&root, &self.path).is_some_and(|v| v.get(name).is_some())
    }

    /// Removes a field and returns it.
    pub fn remove(&mut self, name: &str) -> Dynamic {
        let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        let mut target = &mut *root;
        for segment in &self.path {
            target = match target.as_object_mut().and_then(|o| o.get_mut(&segment.as_str())) {
                Some(t) => t,
                None => return Dynamic::UNIT,
            };
        }
        target.as_object_mut().and_then(|o| o.remove(&name)).map(|v| to_dynamic(&v)).unwrap_or(Dynamic::UNIT)
    }

    /// The field names of the object this handle points to.
    pub fn keys(&mut self) -> Array {
        let root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        at(&root, &self.path)
            .and_then(|v| v.as_object())
            .map(|o| o.iter().map(|(k, _)| Dynamic::from(k.to_string())).collect())
            .unwrap_or_default()
    }

    /// A full copy as a script map (for `to_json`, iteration, debugging).
    pub fn as_map(&mut self) -> Dynamic {
        to_dynamic(&self.value())
    }

    /// The handle reads the whole payload of `root`.
    pub fn points_to_root_of(&self, root: &Arc<Mutex<Value>>) -> bool {
        self.is_root_of(root)
    }
}

fn at<'v>(root: &'v Value, path: &[ImmutableString]) -> Option<&'v Value> {
    let mut current = root;
    for segment in path {
        current = current.get(segment.as_str())?;
    }
    Some(current)
}

/// Payload value → script value (deep for arrays and objects).
pub fn to_dynamic(value: &Value) -> Dynamic {
    if let Some(s) = value.as_str() {
        return Dynamic::from(ImmutableString::from(s));
    }
    if let Some(i) = value.as_i64() {
        return Dynamic::from_int(i);
    }
    if let Some(f) = value.as_f64() {
        return Dynamic::from_float(f);
    }
    if let Some(b) = value.as_bool() {
        return Dynamic::from_bool(b);
    }
    if let Some(items) = value.as_array() {
        return Dynamic::from_array(items.iter().map(to_dynamic).collect());
    }
    if let Some(object) = value.as_object() {
        let mut map = Map::new();
        for (k, v) in object.iter() {
            map.insert(k.into(), to_dynamic(v));
        }
        return Dynamic::from_map(map);
    }
    Dynamic::UNIT
}

/// Script value → payload value. Handles copy what they point to.
pub fn to_value(value: &Dynamic) -> Value {
    if value.is_unit() {
        return Value::new_null();
    }
    if let Ok(b) = value.as_bool() {
        return Value::from(b);
    }
    if let Ok(i) = value.as_int() {
        return Value::from(i);
    }
    if let Ok(f) = value.as_float() {
        return Value::try_from(f).unwrap_or_default();
    }
    if let Some(s) = value.read_lock::<ImmutableString>() {
        return Value::from(s.as_str());
    }
    if let Some(h) = value.read_lock::<EventHandle>() {
        return h.value();
    }
    if let Some(items) = value.read_lock::<Array>() {
        let mut array = Value::new_array();
        if let Some(a) = array.as_array_mut() {
            for item in items.iter() {
                a.push(to_value(item));
            }
        }
        return array;
    }
    if let Some(map) = value.read_lock::<Map>() {
        let mut object = Value::new_object();
        if let Some(o) = object.as_object_mut() {
            for (k, v) in map.iter() {
                o.insert(k.as_str(), to_value(v));
            }
        }
        return object;
    }
    if let Ok(c) = value.as_char() {
        return Value::from(c.to_string().as_str());
    }
    // Timestamps and other script types become their text.
    Value::from(value.to_string().as_str())
}
