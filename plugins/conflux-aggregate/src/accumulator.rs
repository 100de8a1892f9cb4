//! Per-window, per-group metric state. Every kind can merge with another of
//! the same kind, so sliding windows are merges of small buckets.

use std::collections::{HashMap, HashSet};

use conflux_api::sonic_rs::{JsonValueMutTrait, JsonValueTrait};
use conflux_api::Value;
use serde::{Deserialize, Serialize};
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

/// Distinct values counted exactly up to this many, then by HyperLogLog.
const EXACT_DISTINCT: usize = 1024;
/// HyperLogLog precision: 2^14 registers (16 KiB, only past the exact threshold),
/// standard error 1.04/√16384 ≈ 0.8%, so estimates stay within 2%.
const HLL_BITS: u32 = 14;

/// Distinct count: exact while small, HyperLogLog after.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Distinct {
    Exact(HashSet<u64>),
    Sketch(Box<[u8]>),
}

impl Default for Distinct {
    fn default() -> Self {
        Distinct::Exact(HashSet::new())
    }
}

impl Distinct {
    pub fn insert_hash(&mut self, hash: u64) {
        match self {
            Distinct::Exact(set) => {
                set.insert(hash);
                if set.len() > EXACT_DISTINCT {
                    let mut registers = vec![0u8; 1 << HLL_BITS].into_boxed_slice();
                    for h in set.iter() {
                        hll_insert(&mut registers, *h);
                    }
                    *self = Distinct::Sketch(registers);
                }
            }
            Distinct::Sketch(registers) => hll_insert(registers, hash),
        }
    }

    pub fn merge(&mut self, other: &Distinct) {
        match other {
            Distinct::Exact(set) => set.iter().for_each(|h| self.insert_hash(*h)),
            Distinct::Sketch(theirs) => {
                if let Distinct::Exact(set) = self {
                    let mut registers = vec![0u8; 1 << HLL_BITS].into_boxed_slice();
                    set.iter().for_each(|h| hll_insert(&mut registers, *h));
                    *self = Distinct::Sketch(registers);
                }
                if let Distinct::Sketch(mine) = self {
                    for (m, t) in mine.iter_mut().zip(theirs.iter()) {
                        *m = (*m).max(*t);
                    }
                }
            }
        }
    }

    pub fn estimate(&self) -> u64 {
        match self {
            Distinct::Exact(set) => set.len() as u64,
            Distinct::Sketch(registers) => hll_estimate(registers),
        }
    }
}

fn hll_insert(registers: &mut [u8], hash: u64) {
    let index = (hash >> (64 - HLL_BITS)) as usize;
    let rest = (hash << HLL_BITS) | (1 << (HLL_BITS - 1));
    let rank = rest.leading_zeros() as u8 + 1;
    if registers[index] < rank {
        registers[index] = rank;
    }
}

fn hll_estimate(registers: &[u8]) -> u64 {
    let m = registers.len() as f64;
    let alpha = 0.7213 / (1.0 + 1.079 / m);
    let sum: f64 = registers.iter().map(|r| 2f64.powi(-(*r as i32))).sum();
    let raw = alpha * m * m / sum;
    let zeros = registers.iter().filter(|r| **r == 0).count();
    let estimate = if raw <= 2.5 * m && zeros > 0 { m * (m / zeros as f64).ln() } else { raw };
    estimate.round() as u64
}

/// A copy of a value that owns its memory. Values read out of a parsed event
/// share that event's whole buffer; state kept for long (group keys, first
/// and last values) must not pin every event it saw.
pub fn detached(value: &Value) -> Value {
    if let Some(s) = value.as_str() {
        return Value::from(s);
    }
    if let Some(i) = value.as_i64() {
        return Value::from(i);
    }
    if let Some(u) = value.as_u64() {
        return Value::from(u);
    }
    if let Some(f) = value.as_f64() {
        return float(f);
    }
    if let Some(b) = value.as_bool() {
        return Value::from(b);
    }
    if value.is_null() {
        return Value::new_null();
    }
    conflux_api::sonic_rs::from_str(&value.to_string()).unwrap_or_default()
}

/// Hash of a payload value for distinct counting and top-k keys.
pub fn value_hash(value: &Value) -> u64 {
    match value.as_str() {
        Some(s) => string_hash(s),
        None => xxhash_rust::xxh3::xxh3_64(value.to_string().as_bytes()),
    }
}

/// [`value_hash`] of a string value.
pub fn string_hash(s: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(s.as_bytes())
}

/// Approximate heavy hitters (space-saving): keeps `capacity` counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TopK {
    counts: HashMap<String, u64>,
    capacity: usize,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK { counts: HashMap::new(), capacity: (k * 10).max(32) }
    }

    pub fn add(&mut self, key: &str, n: u64) {
        if let Some(c) = self.counts.get_mut(key) {
            *c += n;
            return;
        }
        if self.counts.len() < self.capacity {
            self.counts.insert(key.to_string(), n);
            return;
        }
        // Replace the smallest counter; the newcomer inherits its count (the space-saving bound).
        let (min_key, min_count) =
            self.counts.iter().min_by_key(|(_, c)| **c).map(|(k, c)| (k.clone(), *c)).expect("capacity > 0");
        self.counts.remove(&min_key);
        self.counts.insert(key.to_string(), min_count + n);
    }

    pub fn merge(&mut self, other: &TopK) {
        for (k, c) in &other.counts {
            self.add(k, *c);
        }
    }

    pub fn top(&self, k: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = self.counts.iter().map(|(k, c)| (k.clone(), *c)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }
}

/// A sum that stays an integer while every input is one.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Sum {
    pub int: i64,
    pub float: f64,
    pub is_float: bool,
}

impl Sum {
    /// Adds a number already read: exact while integers, float once any is not.
    pub fn add_number(&mut self, float: f64, int: Option<i64>) {
        match int {
            Some(i) => self.int = self.int.wrapping_add(i),
            None => {
                self.float += float;
                self.is_float = true;
            }
        }
    }

    pub fn merge(&mut self, other: &Sum) {
        self.int = self.int.wrapping_add(other.int);
        self.float += other.float;
        self.is_float |= other.is_float;
    }

    pub fn as_f64(&self) -> f64 {
        self.int as f64 + self.float
    }

    pub fn to_value(self) -> Value {
        if self.is_float {
            Value::try_from(self.as_f64()).unwrap_or_default()
        } else {
            Value::from(self.int)
        }
    }
}

/// State of one metric.
#[derive(Clone, Serialize, Deserialize)]
pub enum Acc {
    Count(u64),
    Sum(Sum),
    Avg(Sum, u64),
    Min(Option<f64>),
    Max(Option<f64>),
    /// (event time, value)
    First(Option<(i64, Value)>),
    Last(Option<(i64, Value)>),
    Rate(u64),
    Distinct(Distinct),
    Percentiles(Box<DDSketch>),
    TopK(TopK),
    /// A gauge's increments within this window (the level is built from these when emitted).
    Gauge(f64),
}

impl Acc {
    pub fn percentiles() -> Acc {
        Acc::Percentiles(Box::new(DDSketch::new(SketchConfig::defaults())))
    }

    /// Merges another accumulator of the same kind into this one.
    pub fn merge(&mut self, other: &Acc) {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) | (Acc::Rate(a), Acc::Rate(b)) => *a += b,
            (Acc::Sum(a), Acc::Sum(b)) => a.merge(b),
            (Acc::Avg(s, n), Acc::Avg(s2, n2)) => {
                s.merge(s2);
                *n += n2;
            }
            (Acc::Min(a), Acc::Min(b)) => *a = min_opt(*a, *b),
            (Acc::Max(a), Acc::Max(b)) => *a = max_opt(*a, *b),
            (Acc::First(a), Acc::First(Some(b))) if a.as_ref().is_none_or(|a| b.0 < a.0) => *a = Some(b.clone()),
            (Acc::Last(a), Acc::Last(Some(b))) if a.as_ref().is_none_or(|a| b.0 >= a.0) => *a = Some(b.clone()),
            (Acc::Distinct(a), Acc::Distinct(b)) => a.merge(b),
            (Acc::Percentiles(a), Acc::Percentiles(b)) => {
                let _ = a.merge(b);
            }
            (Acc::TopK(a), Acc::TopK(b)) => a.merge(b),
            (Acc::Gauge(a), Acc::Gauge(b)) => *a += b,
            _ => {}
        }
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Builds `{"k": v, ...}` from pairs.
pub fn object(pairs: impl IntoIterator<Item = (String, Value)>) -> Value {
    let mut o = Value::new_object();
    if let Some(obj) = o.as_object_mut() {
        for (k, v) in pairs {
            obj.insert(&k, v);
        }
    }
    o
}

/// Builds a JSON array.
pub fn array(items: impl IntoIterator<Item = Value>) -> Value {
    let mut a = Value::new_array();
    if let Some(arr) = a.as_array_mut() {
        for item in items {
            arr.push(item);
        }
    }
    a
}

/// A float as a payload value (null for NaN and infinities).
pub fn float(f: f64) -> Value {
    Value::try_from(f).unwrap_or_default()
}

/// The `q` quantile by nearest rank: the value at 1-based rank ⌈q·n⌉ of the
/// sorted values (p99 of seven values is the largest), as users read a
/// percentile. The sketch's own `quantile` takes 0-based rank ⌊q·(n − 1)⌋,
/// which is lower on small sets.
pub fn quantile(sketch: &DDSketch, q: f64) -> Value {
    let n = sketch.count();
    if n == 0 {
        return Value::new_null();
    }
    // A hair below q·n, so a product like 0.07 × 100 = 7.000000000000001 stays rank 7.
    let x = q * n as f64;
    let rank = ((x - x * 1e-12).ceil() as usize).clamp(1, n);
    // Asked for 0-based rank r, the sketch needs q' with ⌊q'·(n − 1)⌋ = r: the middle
    // of that interval, clear of rounding. The ends are the exact min and max.
    let asked = match rank {
        _ if rank == n => 1.0,
        1 => 0.0,
        _ => (rank as f64 - 0.5) / (n - 1) as f64,
    };
    sketch.quantile(asked).ok().flatten().map(float).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_is_exact_when_small_and_close_when_large() {
        let mut d = Distinct::default();
        for i in 0..500u64 {
            d.insert_hash(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()));
            d.insert_hash(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()));
        }
        assert_eq!(d.estimate(), 500);
        for n in [10_000u64, 100_000] {
            let mut d = Distinct::default();
            for i in 0..n {
                d.insert_hash(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()));
            }
            let error = (d.estimate() as f64 - n as f64).abs() / n as f64;
            assert!(error < 0.02, "{n}: estimate {} is {:.2}% off", d.estimate(), error * 100.0);
        }
    }

    #[test]
    fn distinct_merges_exact_and_sketch() {
        let mut a = Distinct::default();
        let mut b = Distinct::default();
        for i in 0..3000u64 {
            a.insert_hash(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()));
        }
        for i in 2000..2100u64 {
            b.insert_hash(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()));
        }
        b.merge(&a);
        let error = (b.estimate() as f64 - 3000.0).abs() / 3000.0;
        assert!(error < 0.03, "{}", b.estimate());
    }

    #[test]
    fn top_k_finds_heavy_hitters() {
        let mut t = TopK::new(2);
        for i in 0..1000 {
            t.add(&format!("rare-{i}"), 1);
            if i % 3 == 0 {
                t.add("terrace", 1);
            }
            if i % 5 == 0 {
                t.add("bar", 1);
            }
        }
        let top: Vec<String> = t.top(2).into_iter().map(|(k, _)| k).collect();
        assert_eq!(top, vec!["terrace", "bar"]);
    }

    #[test]
    fn percentiles_are_within_sketch_error() {
        let mut acc = Acc::percentiles();
        if let Acc::Percentiles(s) = &mut acc {
            for i in 1..=10_000 {
                s.add(i as f64);
            }
            let p99 = s.quantile(0.99).unwrap().unwrap();
            assert!((p99 - 9900.0).abs() / 9900.0 < 0.02, "{p99}");
        }
    }

    fn sketch_of(values: &[f64]) -> DDSketch {
        let mut s = DDSketch::new(SketchConfig::defaults());
        values.iter().for_each(|v| s.add(*v));
        s
    }

    fn read(s: &DDSketch, q: f64) -> f64 {
        quantile(s, q).as_f64().unwrap()
    }

    fn within_1pct(got: f64, want: f64) -> bool {
        (got - want).abs() <= 0.01 * want.abs()
    }

    /// Nearest rank, worked by hand: rank ⌈q·n⌉ of the sorted values.
    #[test]
    fn percentiles_take_the_nearest_rank() {
        let s = sketch_of(&[5.0, 1.0, 100.0, 3.0, 6.0, 2.0, 4.0]);
        for (q, want) in [
            (0.99, 100.0), // ⌈6.93⌉ = 7th: the largest (the sketch's own rule gives the 6th)
            (0.5, 4.0),    // ⌈3.5⌉ = 4th
            (0.0, 1.0),    // rank 0 is taken as the first
            (1.0, 100.0),
            (0.01, 1.0),      // ⌈0.07⌉ = 1st
            (1.0 / 7.0, 1.0), // exactly 1 → 1st
            (0.15, 2.0),      // ⌈1.05⌉ = 2nd
            (0.86, 100.0),    // ⌈6.02⌉ = 7th
            (0.85, 6.0),      // ⌈5.95⌉ = 6th
        ] {
            let got = read(&s, q);
            assert!(within_1pct(got, want), "p{}: {got}, want {want}", q * 100.0);
        }
        assert_eq!(read(&s, 0.0), 1.0, "the minimum is exact");
        assert_eq!(read(&s, 0.99), 100.0, "the maximum is exact");
        // One value is every percentile; none gives null.
        let one = sketch_of(&[42.0]);
        assert!([0.0, 0.5, 0.99, 1.0].iter().all(|q| read(&one, *q) == 42.0));
        assert!(quantile(&sketch_of(&[]), 0.5).is_null());
        // 0.07 × 100 is 7.000000000000001 in floating point: still the 7th of 100.
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!(within_1pct(read(&sketch_of(&hundred), 0.07), 7.0), "{}", read(&sketch_of(&hundred), 0.07));
        // Negative values and zeros rank with the rest.
        let mixed = sketch_of(&[-5.0, 0.0, 0.0, 3.0]);
        assert!(within_1pct(read(&mixed, 0.25), -5.0) && read(&mixed, 0.5) == 0.0 && read(&mixed, 0.75) == 0.0);
        assert!(within_1pct(read(&mixed, 0.76), 3.0));
    }

    /// On a large, skewed set every percentile is within the sketch's 1% of
    /// the nearest-rank value of the sorted set.
    #[test]
    fn percentiles_match_a_sorted_nearest_rank_within_one_percent() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut values: Vec<f64> = (0..20_000)
            .map(|_| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let u = (seed >> 11) as f64 / (1u64 << 53) as f64;
                // Latency-like: mostly small, a long tail.
                0.5 + 1000.0 * u.powi(6)
            })
            .collect();
        let s = sketch_of(&values);
        values.sort_by(f64::total_cmp);
        let n = values.len();
        // Quantiles in ten-thousandths, so ⌈q·n⌉ is worked out in integers.
        for k in [0, 1, 7, 10, 100, 1000, 2500, 5000, 7500, 9000, 9500, 9900, 9950, 9990, 9999, 10_000] {
            let rank = (k * n).div_ceil(10_000).max(1);
            let want = values[rank - 1];
            let q = k as f64 / 10_000.0;
            let got = read(&s, q);
            assert!(within_1pct(got, want), "p{}: {got}, nearest rank {rank} is {want}", q * 100.0);
        }
    }

    #[test]
    fn rates_and_gauge_increments_merge_by_adding() {
        // Sliding windows merge buckets: a rate is the merged count over the
        // window's length, and a gauge bucket holds only its own increments
        // (the level is the carried level plus these, never a sum of levels).
        let mut rate = Acc::Rate(3);
        rate.merge(&Acc::Rate(2));
        assert!(matches!(rate, Acc::Rate(5)));
        let mut gauge = Acc::Gauge(4.0);
        gauge.merge(&Acc::Gauge(-1.5));
        assert!(matches!(gauge, Acc::Gauge(g) if g == 2.5));
        // Kinds that differ never mix.
        let mut count = Acc::Count(1);
        count.merge(&Acc::Rate(7));
        assert!(matches!(count, Acc::Count(1)));
    }

    #[test]
    fn sums_stay_integers() {
        let mut s = Sum::default();
        s.add_number(2.0, Some(2));
        s.add_number(3.0, Some(3));
        assert_eq!(s.to_value().to_string(), "5");
        s.add_number(0.5, None);
        assert_eq!(s.to_value().to_string(), "5.5");
    }
}
