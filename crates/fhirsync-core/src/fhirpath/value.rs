//! FHIRPath values: system types, dates with precision, quantities, and
//! nodes borrowed from the resource being evaluated.

use std::cmp::Ordering;
use std::fmt;

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use rust_decimal::Decimal;
use serde_json::Value;

/// One item of a FHIRPath collection.
#[derive(Debug, Clone)]
pub enum Item<'a> {
    Bool(bool),
    Int(i64),
    Dec(Decimal),
    Str(String),
    Date(Temporal),
    DateTime(Temporal),
    Time(Temporal),
    Qty(Decimal, String),
    /// An element of the resource: its JSON, its FHIR type when known (from
    /// a choice suffix or `resourceType`), and the `_name` sibling of a
    /// primitive (its id and extensions).
    Node(Node<'a>),
    /// What `type()` returns: namespace and name (`.namespace`, `.name`).
    Type(&'static str, String),
}

#[derive(Debug, Clone)]
pub struct Node<'a> {
    pub v: &'a Value,
    pub ty: Option<String>,
    pub ext: Option<&'a Value>,
}

pub(crate) static NULL: Value = Value::Null;

const FHIR_PRIMITIVES: &[&str] = &[
    "boolean",
    "integer",
    "string",
    "decimal",
    "uri",
    "url",
    "canonical",
    "base64Binary",
    "instant",
    "date",
    "dateTime",
    "time",
    "code",
    "oid",
    "id",
    "markdown",
    "unsignedInt",
    "positiveInt",
    "uuid",
    "xhtml",
    "integer64",
];

/// The FHIR type named by a choice suffix (`valueQuantity` → `Quantity`,
/// `valueDateTime` → `dateTime`).
pub fn choice_type(suffix: &str) -> String {
    let mut c = suffix.chars();
    let lower: String = match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    };
    if FHIR_PRIMITIVES.contains(&lower.as_str()) {
        lower
    } else {
        suffix.to_owned()
    }
}

pub fn is_fhir_primitive(t: &str) -> bool {
    FHIR_PRIMITIVES.contains(&t)
}

impl<'a> Item<'a> {
    pub fn node(v: &'a Value) -> Item<'a> {
        Item::Node(Node {
            v,
            ty: None,
            ext: None,
        })
    }

    /// The item as a system value: primitives of the resource become
    /// Boolean/Integer/Decimal/String (or a date when their type says so),
    /// Quantity elements become quantities; complex elements stay nodes.
    pub fn prim(&self) -> Item<'a> {
        let Item::Node(n) = self else {
            return self.clone();
        };
        match n.v {
            Value::Bool(b) => Item::Bool(*b),
            Value::Number(x) => {
                let t = x.to_string();
                match t.parse::<i64>() {
                    Ok(i) if n.ty.as_deref() != Some("decimal") => Item::Int(i),
                    _ => parse_decimal(&t).map(Item::Dec).unwrap_or(self.clone()),
                }
            }
            Value::String(s) => match n.ty.as_deref() {
                Some("date") => Temporal::parse_date(s).map(Item::Date),
                Some("dateTime") | Some("instant") => {
                    Temporal::parse_datetime(s).map(Item::DateTime)
                }
                Some("time") => Temporal::parse_time(s).map(Item::Time),
                _ => None,
            }
            .unwrap_or_else(|| Item::Str(s.clone())),
            Value::Object(o) if n.ty.as_deref() == Some("Quantity") || is_quantity(o) => o
                .get("value")
                .and_then(|v| parse_decimal(&v.to_string()))
                .map(|d| {
                    let unit = o
                        .get("code")
                        .or_else(|| o.get("unit"))
                        .and_then(Value::as_str)
                        .unwrap_or("1");
                    Item::Qty(d, unit.to_owned())
                })
                .unwrap_or(self.clone()),
            _ => self.clone(),
        }
    }

    /// The type name used by `is`, `as`, `ofType` and `type()`, with its
    /// namespace.
    pub fn type_name(&self) -> (&'static str, String) {
        let sys = |n: &str| ("System", n.to_owned());
        match self {
            Item::Bool(_) => sys("Boolean"),
            Item::Int(_) => sys("Integer"),
            Item::Dec(_) => sys("Decimal"),
            Item::Str(_) => sys("String"),
            Item::Date(_) => sys("Date"),
            Item::DateTime(_) => sys("DateTime"),
            Item::Time(_) => sys("Time"),
            Item::Qty(..) => sys("Quantity"),
            Item::Type(..) => sys("TypeInfo"),
            Item::Node(n) => {
                if let Some(t) = &n.ty {
                    return ("FHIR", t.clone());
                }
                let t = match n.v {
                    Value::Bool(_) => "boolean".to_owned(),
                    Value::Number(x) if x.to_string().contains(['.', 'e', 'E']) => {
                        "decimal".to_owned()
                    }
                    Value::Number(_) => "integer".to_owned(),
                    Value::String(_) => "string".to_owned(),
                    Value::Object(o) => match o.get("resourceType").and_then(Value::as_str) {
                        Some(r) => r.to_owned(),
                        None if is_quantity(o) => "Quantity".to_owned(),
                        None => "Element".to_owned(),
                    },
                    _ => "Element".to_owned(),
                };
                ("FHIR", t)
            }
        }
    }

    pub fn as_str(&self) -> Option<String> {
        match self.prim() {
            Item::Str(s) => Some(s),
            _ => None,
        }
    }
}

fn is_quantity(o: &serde_json::Map<String, Value>) -> bool {
    o.contains_key("value")
        && (o.contains_key("unit") || o.contains_key("code"))
        && !o.contains_key("resourceType")
        && o.keys().all(|k| {
            matches!(
                k.as_str(),
                "value" | "unit" | "code" | "system" | "comparator" | "id" | "extension"
            )
        })
}

pub fn parse_decimal(s: &str) -> Option<Decimal> {
    if s.contains(['e', 'E']) {
        return Decimal::from_scientific(s).ok();
    }
    s.parse::<Decimal>().ok()
}

/// A Date, DateTime or Time with the precision it was written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Temporal {
    /// year, month, day, hour, minute, second, millisecond; `len` are known.
    pub f: [i64; 7],
    pub len: usize,
    /// Offset from UTC in minutes, when given.
    pub tz: Option<i32>,
    /// Digits of the fraction of a second as written.
    pub frac_digits: usize,
    pub is_time: bool,
}

impl Temporal {
    fn digits(s: &str, n: usize) -> Option<(i64, &str)> {
        if s.len() < n || !s.as_bytes()[..n].iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some((s[..n].parse().ok()?, &s[n..]))
    }

    /// `HH[:MM[:SS[.fff]]]` into fields 3..; returns the rest.
    fn parse_clock<'s>(t: &mut Temporal, s: &'s str) -> Option<&'s str> {
        let (h, mut r) = Self::digits(s, 2)?;
        t.f[3] = h;
        t.len = 4;
        if let Some(x) = r.strip_prefix(':') {
            let (m, r2) = Self::digits(x, 2)?;
            t.f[4] = m;
            t.len = 5;
            r = r2;
            if let Some(x) = r.strip_prefix(':') {
                let (sec, r3) = Self::digits(x, 2)?;
                t.f[5] = sec;
                t.len = 6;
                r = r3;
                if let Some(x) = r.strip_prefix('.') {
                    let n = x.bytes().take_while(u8::is_ascii_digit).count();
                    if n == 0 {
                        return None;
                    }
                    let ms: String = x[..n].chars().chain("000".chars()).take(3).collect();
                    t.f[6] = ms.parse().ok()?;
                    t.frac_digits = n;
                    t.len = 7;
                    r = &x[n..];
                }
            }
        }
        if t.f[3] > 23 || t.f[4] > 59 || t.f[5] > 59 {
            return None;
        }
        Some(r)
    }

    fn parse_ymd(s: &str) -> Option<(Temporal, &str)> {
        let mut t = Temporal {
            f: [0, 1, 1, 0, 0, 0, 0],
            len: 1,
            tz: None,
            frac_digits: 0,
            is_time: false,
        };
        let (y, mut r) = Self::digits(s, 4)?;
        t.f[0] = y;
        if let Some(x) = r.strip_prefix('-') {
            let (m, r2) = Self::digits(x, 2)?;
            t.f[1] = m;
            t.len = 2;
            r = r2;
            if let Some(x) = r.strip_prefix('-') {
                let (d, r3) = Self::digits(x, 2)?;
                t.f[2] = d;
                t.len = 3;
                r = r3;
            }
        }
        if !(1..=12).contains(&t.f[1])
            || NaiveDate::from_ymd_opt(y as i32, t.f[1] as u32, t.f[2] as u32).is_none()
        {
            return None;
        }
        Some((t, r))
    }

    pub fn parse_date(s: &str) -> Option<Temporal> {
        match Self::parse_ymd(s)? {
            (t, "") => Some(t),
            _ => None,
        }
    }

    fn parse_tz(t: &mut Temporal, r: &str) -> Option<()> {
        match r {
            "" => Some(()),
            "Z" => {
                t.tz = Some(0);
                Some(())
            }
            _ => {
                let sign = match r.as_bytes()[0] {
                    b'+' => 1,
                    b'-' => -1,
                    _ => return None,
                };
                let (h, r2) = Self::digits(&r[1..], 2)?;
                let (m, r3) = Self::digits(r2.strip_prefix(':')?, 2)?;
                if !r3.is_empty() || h > 14 || m > 59 {
                    return None;
                }
                t.tz = Some(sign * (h * 60 + m) as i32);
                Some(())
            }
        }
    }

    /// A DateTime: a date, optionally `T` and a time and a zone. `2015T` is
    /// a DateTime of year precision.
    pub fn parse_datetime(s: &str) -> Option<Temporal> {
        let (mut t, r) = Self::parse_ymd(s)?;
        let Some(r) = r.strip_prefix('T') else {
            return r.is_empty().then_some(t);
        };
        if r.is_empty() {
            return Some(t);
        }
        if t.len < 3 {
            return None;
        }
        let r = Self::parse_clock(&mut t, r)?;
        Self::parse_tz(&mut t, r)?;
        Some(t)
    }

    pub fn parse_time(s: &str) -> Option<Temporal> {
        let mut t = Temporal {
            f: [0, 1, 1, 0, 0, 0, 0],
            len: 3,
            tz: None,
            frac_digits: 0,
            is_time: true,
        };
        match Self::parse_clock(&mut t, s)? {
            "" => Some(t),
            _ => None,
        }
    }

    /// Precision for comparison: seconds and milliseconds are one level.
    fn level(&self) -> usize {
        self.len.min(6)
    }

    fn naive(&self) -> Option<NaiveDateTime> {
        NaiveDate::from_ymd_opt(self.f[0] as i32, self.f[1] as u32, self.f[2] as u32)?
            .and_hms_milli_opt(
                self.f[3] as u32,
                self.f[4] as u32,
                self.f[5] as u32,
                self.f[6] as u32,
            )
    }

    fn with_naive(&self, n: NaiveDateTime) -> Temporal {
        let mut t = self.clone();
        t.f = [
            n.year() as i64,
            n.month() as i64,
            n.day() as i64,
            n.hour() as i64,
            n.minute() as i64,
            n.second() as i64,
            (n.nanosecond() / 1_000_000) as i64,
        ];
        t
    }

    /// In UTC when a zone is given and the value has a time.
    fn normalized(&self) -> Temporal {
        match (self.tz, self.len >= 4 && !self.is_time) {
            (Some(tz), true) if tz != 0 => match self.naive() {
                Some(n) => {
                    let mut t = self.with_naive(n - Duration::minutes(tz as i64));
                    t.tz = Some(0);
                    t
                }
                None => self.clone(),
            },
            _ => self.clone(),
        }
    }

    /// Ordering when it is known; `None` when the precisions differ and the
    /// common part is equal.
    pub fn compare(&self, other: &Temporal) -> Option<Ordering> {
        if self.tz.is_some() != other.tz.is_some()
            && self.len >= 4
            && other.len >= 4
            && !self.is_time
        {
            return None;
        }
        let (a, b) = if self.tz.is_some() && other.tz.is_some() {
            (self.normalized(), other.normalized())
        } else {
            (self.clone(), other.clone())
        };
        let (start, na, nb) = if a.is_time {
            (3, a.level(), b.level())
        } else {
            (0, a.level(), b.level())
        };
        let n = na.min(nb);
        for i in start..n {
            let (x, y) = if i == 5 {
                (a.f[5] * 1000 + a.f[6], b.f[5] * 1000 + b.f[6])
            } else {
                (a.f[i], b.f[i])
            };
            match x.cmp(&y) {
                Ordering::Equal => {}
                o => return Some(o),
            }
        }
        (na == nb).then_some(Ordering::Equal)
    }

    /// Adds a calendar duration; the unit is cut to the value's precision.
    pub fn add(&self, amount: Decimal, unit: &str) -> Option<Temporal> {
        let unit = calendar_unit(unit)?;
        let whole = amount.trunc().to_i64()?;
        let mut t = self.clone();
        match unit {
            "year" | "month" => {
                let months = if unit == "year" { whole * 12 } else { whole };
                if unit == "month" && self.len < 2 && !self.is_time {
                    // month arithmetic on a year: whole years only
                    t.f[0] = t.f[0]
                        .checked_add(months / 12)
                        .filter(|y| (0..=9999).contains(y))?;
                    return Some(t);
                }
                let total = t.f[0]
                    .checked_mul(12)?
                    .checked_add(t.f[1] - 1)?
                    .checked_add(months)?;
                if !(0..=9999 * 12 + 11).contains(&total) {
                    return None;
                }
                t.f[0] = total.div_euclid(12);
                t.f[1] = total.rem_euclid(12) + 1;
                let last = last_day(t.f[0], t.f[1]);
                t.f[2] = t.f[2].min(last);
                Some(t)
            }
            _ => {
                let ms = match unit {
                    "week" => whole.checked_mul(7 * 86_400_000)?,
                    "day" => whole.checked_mul(86_400_000)?,
                    "hour" => whole.checked_mul(3_600_000)?,
                    "minute" => whole.checked_mul(60_000)?,
                    "second" => amount.checked_mul(Decimal::from(1000))?.trunc().to_i64()?,
                    _ => whole,
                };
                let unit_ms: i64 = match self.len {
                    1 => 365 * 86_400_000,
                    2 => 28 * 86_400_000,
                    3 => 86_400_000,
                    4 => 3_600_000,
                    5 => 60_000,
                    6 => 1000,
                    _ => 1,
                };
                let ms = if self.is_time {
                    ms
                } else {
                    ms / unit_ms * unit_ms
                };
                if self.len < 3 && !self.is_time {
                    return Some(t);
                }
                let n = self
                    .naive()?
                    .checked_add_signed(Duration::try_milliseconds(ms)?)?;
                let mut out = self.with_naive(n);
                if self.is_time {
                    out.f[0] = 0;
                    out.f[1] = 1;
                    out.f[2] = 1;
                }
                Some(out)
            }
        }
    }

    pub fn with_len(&self, len: usize) -> Temporal {
        let mut t = self.clone();
        t.len = len;
        if len < 7 {
            t.frac_digits = 0;
        }
        t
    }
}

fn last_day(y: i64, m: i64) -> i64 {
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    NaiveDate::from_ymd_opt(ny as i32, nm as u32, 1)
        .and_then(|d| d.pred_opt())
        .map(|d| d.day() as i64)
        .unwrap_or(28)
}

impl fmt::Display for Temporal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.f;
        if !self.is_time {
            write!(f, "{:04}", v[0])?;
            if self.len >= 2 {
                write!(f, "-{:02}", v[1])?;
            }
            if self.len >= 3 {
                write!(f, "-{:02}", v[2])?;
            }
            if self.len >= 4 {
                f.write_str("T")?;
            }
        }
        if self.len >= 4 {
            write!(f, "{:02}", v[3])?;
        }
        if self.len >= 5 {
            write!(f, ":{:02}", v[4])?;
        }
        if self.len >= 6 {
            write!(f, ":{:02}", v[5])?;
        }
        if self.len >= 7 {
            let ms = format!("{:03}", v[6]);
            let n = self.frac_digits.clamp(1, 3);
            write!(f, ".{}", &ms[..n])?;
        }
        if self.len >= 4 && !self.is_time {
            match self.tz {
                Some(0) => f.write_str("Z")?,
                Some(m) => write!(
                    f,
                    "{}{:02}:{:02}",
                    if m < 0 { '-' } else { '+' },
                    m.abs() / 60,
                    m.abs() % 60
                )?,
                None => {}
            }
        }
        Ok(())
    }
}

/// Whether a unit is a calendar duration word (`day`, `years`), not a
/// UCUM code.
pub fn is_calendar_word(u: &str) -> bool {
    calendar_unit(u).is_some() && u.len() > 2 && !matches!(u, "min")
}

/// The calendar unit a duration word or UCUM time unit stands for (UCUM
/// `a` and `mo` are not calendar years and months: none).
pub fn calendar_unit(u: &str) -> Option<&'static str> {
    Some(match u {
        "year" | "years" => "year",
        "month" | "months" => "month",
        "week" | "weeks" | "wk" => "week",
        "day" | "days" | "d" => "day",
        "hour" | "hours" | "h" => "hour",
        "minute" | "minutes" | "min" => "minute",
        "second" | "seconds" | "s" => "second",
        "millisecond" | "milliseconds" | "ms" => "millisecond",
        _ => return None,
    })
}

/// A unit's dimension and factor to its base unit (a small UCUM table).
fn unit_base(u: &str) -> Option<(&'static str, Decimal)> {
    let d = |s: &str| s.parse::<Decimal>().ok();
    let (dim, f) = match u {
        "g" => ("g", d("1")),
        "kg" => ("g", d("1000")),
        "mg" => ("g", d("0.001")),
        "ug" => ("g", d("0.000001")),
        "m" => ("m", d("1")),
        "cm" => ("m", d("0.01")),
        "mm" => ("m", d("0.001")),
        "km" => ("m", d("1000")),
        "[in_i]" => ("m", d("0.0254")),
        "s" | "second" | "seconds" => ("s", d("1")),
        "ms" | "millisecond" | "milliseconds" => ("s", d("0.001")),
        "min" | "minute" | "minutes" => ("s", d("60")),
        "h" | "hour" | "hours" => ("s", d("3600")),
        "d" | "day" | "days" => ("s", d("86400")),
        "wk" | "week" | "weeks" => ("s", d("604800")),
        "L" | "l" => ("L", d("1")),
        "mL" | "ml" => ("L", d("0.001")),
        "1" => ("1", d("1")),
        "%" => ("1", d("0.01")),
        _ => return None,
    };
    Some((dim, f?))
}

/// Compares two quantities: `None` when the units cannot be compared.
pub fn compare_qty(a: (&Decimal, &str), b: (&Decimal, &str)) -> Option<Ordering> {
    if a.1 == b.1 {
        return Some(a.0.cmp(b.0));
    }
    // calendar years and months are not fixed lengths
    let fixed = |u: &str| !matches!(u, "year" | "years" | "month" | "months");
    if !fixed(a.1) || !fixed(b.1) {
        return None;
    }
    let (da, fa) = unit_base(a.1)?;
    let (db, fb) = unit_base(b.1)?;
    if da != db {
        return None;
    }
    Some(a.0.checked_mul(fa)?.cmp(&b.0.checked_mul(fb)?))
}

fn f64_dec(x: f64) -> Option<Decimal> {
    Decimal::from_f64(x)
}

pub fn dec_f64(d: &Decimal) -> f64 {
    d.to_f64().unwrap_or(f64::NAN)
}

pub fn dec_from_f64(x: f64) -> Option<Decimal> {
    if x.is_finite() {
        f64_dec(x)
    } else {
        None
    }
}

/// Equality (`=`) of two items: `None` when it is unknown (dates of
/// different precision).
pub fn equal(a: &Item, b: &Item) -> Option<bool> {
    let (a, b) = (a.prim(), b.prim());
    match (&a, &b) {
        (Item::Node(x), Item::Node(y)) => Some(x.v == y.v),
        (Item::Str(x), Item::Str(y)) => Some(x == y),
        (Item::Bool(x), Item::Bool(y)) => Some(x == y),
        (Item::Qty(x, u), Item::Qty(y, v)) => {
            Some(compare_qty((x, u), (y, v)) == Some(Ordering::Equal))
        }
        _ => {
            if let (Some(x), Some(y)) = (num(&a), num(&b)) {
                return Some(x == y);
            }
            if let (Some(x), Some(y)) = temporal_pair(&a, &b) {
                if x.is_time != y.is_time {
                    return Some(false);
                }
                return x.compare(&y).map(|o| o == Ordering::Equal);
            }
            Some(false)
        }
    }
}

/// Equivalence (`~`).
pub fn equivalent(a: &Item, b: &Item) -> bool {
    let (a, b) = (a.prim(), b.prim());
    match (&a, &b) {
        (Item::Str(x), Item::Str(y)) => norm_ws(x) == norm_ws(y),
        (Item::Node(x), Item::Node(y)) => x.v == y.v,
        (Item::Dec(_), _) | (_, Item::Dec(_)) => match (num(&a), num(&b)) {
            (Some(x), Some(y)) => {
                let s = x.scale().min(y.scale());
                x.round_dp(s) == y.round_dp(s)
            }
            _ => false,
        },
        (Item::Qty(x, u), Item::Qty(y, v)) => match (unit_base(u), unit_base(v)) {
            (Some((du, fu)), Some((dv, fv))) if du == dv && u != v => {
                let (Some(a), Some(b)) = (x.checked_mul(fu), y.checked_mul(fv)) else {
                    return false;
                };
                let (a, b) = (a.normalize(), b.normalize());
                let s = a.scale().min(b.scale());
                a.round_dp(s) == b.round_dp(s)
            }
            _ => {
                let s = x.scale().min(y.scale());
                compare_qty((&x.round_dp(s), u), (&y.round_dp(s), v)) == Some(Ordering::Equal)
            }
        },
        _ => {
            if let (Some(x), Some(y)) = temporal_pair(&a, &b) {
                return x.compare(&y) == Some(Ordering::Equal);
            }
            equal(&a, &b) == Some(true)
        }
    }
}

fn norm_ws(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

pub fn num(i: &Item) -> Option<Decimal> {
    match i {
        Item::Int(x) => Some(Decimal::from(*x)),
        Item::Dec(d) => Some(*d),
        _ => None,
    }
}

/// Two temporal values; a string beside a date is read as a date.
fn temporal_pair(a: &Item, b: &Item) -> (Option<Temporal>, Option<Temporal>) {
    fn t(i: &Item, other: &Item) -> Option<Temporal> {
        match i {
            Item::Date(t) | Item::DateTime(t) | Item::Time(t) => Some(t.clone()),
            Item::Str(s) => match other {
                Item::Date(_) => Temporal::parse_date(s).or_else(|| Temporal::parse_datetime(s)),
                Item::DateTime(_) => Temporal::parse_datetime(s),
                Item::Time(_) => Temporal::parse_time(s),
                _ => None,
            },
            _ => None,
        }
    }
    (t(a, b), t(b, a))
}

/// Ordering for `<`, `>`, …: `Err` when the types cannot be compared,
/// `Ok(None)` when the answer is unknown.
pub fn order(a: &Item, b: &Item) -> Result<Option<Ordering>, String> {
    let (a, b) = (a.prim(), b.prim());
    match (&a, &b) {
        (Item::Str(x), Item::Str(y)) => Ok(Some(x.cmp(y))),
        (Item::Qty(x, u), Item::Qty(y, v)) => Ok(compare_qty((x, u), (y, v))),
        _ => {
            if let (Some(x), Some(y)) = (num(&a), num(&b)) {
                return Ok(Some(x.cmp(&y)));
            }
            if let (Some(x), Some(y)) = temporal_pair(&a, &b) {
                if x.is_time != y.is_time {
                    return Err("cannot compare a time with a date".into());
                }
                return Ok(x.compare(&y));
            }
            Err(format!(
                "cannot compare {} with {}",
                a.type_name().1,
                b.type_name().1
            ))
        }
    }
}

impl fmt::Display for Item<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prim() {
            Item::Bool(b) => write!(f, "{b}"),
            Item::Int(i) => write!(f, "{i}"),
            Item::Dec(d) => write!(f, "{d}"),
            Item::Str(s) => f.write_str(&s),
            Item::Date(t) | Item::DateTime(t) => write!(f, "{t}"),
            Item::Time(t) => write!(f, "{t}"),
            Item::Qty(d, u) => {
                if is_calendar_word(&u) {
                    write!(f, "{d} {u}")
                } else {
                    write!(f, "{d} '{u}'")
                }
            }
            Item::Node(n) => write!(f, "{}", n.v),
            Item::Type(ns, n) => write!(f, "{ns}.{n}"),
        }
    }
}

/// Time of day now, for `timeOfDay()`.
pub fn time_of(n: NaiveTime) -> Temporal {
    Temporal {
        f: [
            0,
            1,
            1,
            n.hour() as i64,
            n.minute() as i64,
            n.second() as i64,
            (n.nanosecond() / 1_000_000) as i64,
        ],
        len: 7,
        tz: None,
        frac_digits: 3,
        is_time: true,
    }
}
