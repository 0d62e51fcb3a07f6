//! A FHIRPath subset for filters: boolean expressions over one resource.
//!
//! Supported: member paths (optionally starting with the resource type),
//! string / number / boolean literals, `=`, `!=`, `<`, `<=`, `>`, `>=`,
//! `and`, `or`, `xor`, `implies`, `in`, `|`, parentheses, and the functions
//! `exists([criteria])`, `empty()`, `not()`, `count()`, `where(criteria)`,
//! `first()`, `ofType(T)`, `startsWith(s)`, `contains(s)`. Anything else is
//! refused when the expression is parsed, never at evaluation time.

use std::cmp::Ordering;

use serde_json::Value;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// The input collection (`$this` at the start of a path).
    This,
    Literal(Value),
    /// A member (or, first in a path, a type name that filters the input).
    Member(Box<Expr>, String),
    Call(Box<Expr>, String, Vec<Expr>),
    Binary(Box<Expr>, Op, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    Xor,
    Implies,
    In,
    Union,
}

const FUNCTIONS: &[(&str, usize, usize)] = &[
    ("exists", 0, 1),
    ("empty", 0, 0),
    ("not", 0, 0),
    ("count", 0, 0),
    ("where", 1, 1),
    ("first", 0, 0),
    ("ofType", 1, 1),
    ("startsWith", 1, 1),
    ("contains", 1, 1),
];

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Sym(&'static str),
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' {
            let mut v = String::new();
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err("unterminated string literal".into()),
                    Some(b'\'') => break,
                    Some(b'\\') => {
                        let e = *b.get(i + 1).ok_or("unterminated escape")?;
                        v.push(match e {
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            other => other as char,
                        });
                        i += 2;
                    }
                    Some(_) => {
                        let ch = s[i..].chars().next().ok_or("bad text")?;
                        v.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            i += 1;
            out.push(Tok::Str(v));
        } else if c.is_ascii_digit() {
            let st = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            out.push(Tok::Num(s[st..i].to_owned()));
        } else if c.is_ascii_alphabetic() || c == '_' || c == '$' || c == '`' {
            if c == '`' {
                let end = s[i + 1..].find('`').ok_or("unterminated `identifier`")?;
                out.push(Tok::Ident(s[i + 1..i + 1 + end].to_owned()));
                i += end + 2;
                continue;
            }
            let st = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(s[st..i].to_owned()));
        } else {
            let two = s.get(i..i + 2).unwrap_or("");
            let sym = match two {
                "!=" => "!=",
                "<=" => "<=",
                ">=" => ">=",
                _ => match c {
                    '=' => "=",
                    '<' => "<",
                    '>' => ">",
                    '.' => ".",
                    '(' => "(",
                    ')' => ")",
                    ',' => ",",
                    '|' => "|",
                    _ => return Err(format!("unexpected character '{c}'")),
                },
            };
            i += sym.len();
            out.push(Tok::Sym(sym));
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn eat_sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(x)) if *x == s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn eat_word(&mut self, w: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(x)) if x == w) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn binary(
        &mut self,
        ops: &[(&'static str, Op)],
        words: bool,
        next: fn(&mut Parser) -> Result<Expr, String>,
    ) -> Result<Expr, String> {
        let mut left = next(self)?;
        'outer: loop {
            for (s, op) in ops {
                let hit = if words {
                    self.eat_word(s)
                } else {
                    self.eat_sym(s)
                };
                if hit {
                    let right = next(self)?;
                    left = Expr::Binary(Box::new(left), *op, Box::new(right));
                    continue 'outer;
                }
            }
            return Ok(left);
        }
    }
    fn implies(&mut self) -> Result<Expr, String> {
        self.binary(&[("implies", Op::Implies)], true, Parser::or)
    }
    fn or(&mut self) -> Result<Expr, String> {
        self.binary(&[("or", Op::Or), ("xor", Op::Xor)], true, Parser::and)
    }
    fn and(&mut self) -> Result<Expr, String> {
        self.binary(&[("and", Op::And)], true, Parser::membership)
    }
    fn membership(&mut self) -> Result<Expr, String> {
        self.binary(&[("in", Op::In)], true, Parser::equality)
    }
    fn equality(&mut self) -> Result<Expr, String> {
        self.binary(&[("=", Op::Eq), ("!=", Op::Ne)], false, Parser::compare)
    }
    fn compare(&mut self) -> Result<Expr, String> {
        self.binary(
            &[("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)],
            false,
            Parser::union,
        )
    }
    fn union(&mut self) -> Result<Expr, String> {
        self.binary(&[("|", Op::Union)], false, Parser::term)
    }
    fn term(&mut self) -> Result<Expr, String> {
        let mut e = self.primary()?;
        while self.eat_sym(".") {
            e = self.invocation(e)?;
        }
        Ok(e)
    }
    fn primary(&mut self) -> Result<Expr, String> {
        match self.peek().cloned() {
            Some(Tok::Str(s)) => {
                self.pos += 1;
                Ok(Expr::Literal(Value::String(s)))
            }
            Some(Tok::Num(n)) => {
                self.pos += 1;
                let v: Value = serde_json::from_str(&n).map_err(|_| format!("bad number '{n}'"))?;
                Ok(Expr::Literal(v))
            }
            Some(Tok::Ident(w)) if w == "true" || w == "false" => {
                self.pos += 1;
                Ok(Expr::Literal(Value::Bool(w == "true")))
            }
            Some(Tok::Ident(w)) if w == "$this" => {
                self.pos += 1;
                Ok(Expr::This)
            }
            Some(Tok::Sym("(")) => {
                self.pos += 1;
                let e = self.implies()?;
                if !self.eat_sym(")") {
                    return Err("missing ')'".into());
                }
                Ok(e)
            }
            Some(Tok::Ident(_)) => self.invocation(Expr::This),
            Some(t) => Err(format!("unexpected {t:?}")),
            None => Err("unexpected end of expression".into()),
        }
    }
    fn invocation(&mut self, on: Expr) -> Result<Expr, String> {
        let Some(Tok::Ident(name)) = self.peek().cloned() else {
            return Err("expected a name after '.'".into());
        };
        self.pos += 1;
        if !self.eat_sym("(") {
            return Ok(Expr::Member(Box::new(on), name));
        }
        let Some(&(_, min, max)) = FUNCTIONS.iter().find(|f| f.0 == name) else {
            return Err(format!("function '{name}' is not supported"));
        };
        let mut args = Vec::new();
        if !self.eat_sym(")") {
            loop {
                args.push(self.implies()?);
                if self.eat_sym(")") {
                    break;
                }
                if !self.eat_sym(",") {
                    return Err(format!("expected ',' or ')' in {name}()"));
                }
            }
        }
        if args.len() < min || args.len() > max {
            return Err(format!("{name}() takes {min} to {max} arguments"));
        }
        Ok(Expr::Call(Box::new(on), name, args))
    }
}

/// Parses an expression; the error says what is wrong or unsupported.
pub fn parse(s: &str) -> Result<Expr, String> {
    let mut p = Parser {
        toks: lex(s)?,
        pos: 0,
    };
    let e = p.implies()?;
    if p.pos != p.toks.len() {
        return Err(format!("unexpected {:?}", p.toks[p.pos]));
    }
    Ok(e)
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.to_string().parse().ok(),
        _ => None,
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => num(a)?.partial_cmp(&num(b)?),
    }
}

/// A singleton boolean, `None` for the empty collection.
fn truth(c: &[Value]) -> Option<bool> {
    match c {
        [] => None,
        [Value::Bool(b)] => Some(*b),
        _ => Some(true),
    }
}

fn boolean(b: Option<bool>) -> Vec<Value> {
    b.map(|b| vec![Value::Bool(b)]).unwrap_or_default()
}

fn eval(e: &Expr, input: &[Value]) -> Vec<Value> {
    match e {
        Expr::This => input.to_vec(),
        Expr::Literal(v) => vec![v.clone()],
        Expr::Member(on, name) => {
            let base = eval(on, input);
            let is_type_filter = matches!(**on, Expr::This)
                && name.chars().next().is_some_and(|c| c.is_ascii_uppercase());
            if is_type_filter {
                return base
                    .into_iter()
                    .filter(|v| v.get("resourceType").and_then(Value::as_str) == Some(name))
                    .collect();
            }
            let mut out = Vec::new();
            for v in base {
                match v.get(name) {
                    Some(Value::Array(a)) => out.extend(a.iter().cloned()),
                    Some(x) => out.push(x.clone()),
                    None => {}
                }
            }
            out
        }
        Expr::Call(on, name, args) => call(&eval(on, input), name, args),
        Expr::Binary(l, op, r) => {
            let (a, b) = (eval(l, input), eval(r, input));
            binary(*op, a, b)
        }
    }
}

fn call(base: &[Value], name: &str, args: &[Expr]) -> Vec<Value> {
    let filtered = |crit: &Expr| -> Vec<Value> {
        base.iter()
            .filter(|v| truth(&eval(crit, std::slice::from_ref(*v))) == Some(true))
            .cloned()
            .collect()
    };
    let text = |i: usize| -> Option<String> {
        match eval(&args[i], base).as_slice() {
            [Value::String(s)] => Some(s.clone()),
            _ => None,
        }
    };
    match name {
        "exists" => match args.first() {
            Some(c) => boolean(Some(!filtered(c).is_empty())),
            None => boolean(Some(!base.is_empty())),
        },
        "empty" => boolean(Some(base.is_empty())),
        "not" => boolean(truth(base).map(|b| !b)),
        "count" => vec![Value::from(base.len() as u64)],
        "where" => filtered(&args[0]),
        "first" => base.first().cloned().into_iter().collect(),
        "ofType" => match &args[0] {
            Expr::Member(on, t) if matches!(**on, Expr::This) => base
                .iter()
                .filter(|v| v.get("resourceType").and_then(Value::as_str) == Some(t))
                .cloned()
                .collect(),
            _ => Vec::new(),
        },
        "startsWith" | "contains" => match (base, text(0)) {
            ([Value::String(s)], Some(p)) => boolean(Some(if name == "startsWith" {
                s.starts_with(&p)
            } else {
                s.contains(&p)
            })),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

fn binary(op: Op, a: Vec<Value>, b: Vec<Value>) -> Vec<Value> {
    match op {
        Op::Union => {
            let mut out = a;
            for v in b {
                if !out.iter().any(|x| equal(x, &v)) {
                    out.push(v);
                }
            }
            out
        }
        Op::Eq | Op::Ne => {
            if a.is_empty() || b.is_empty() {
                return Vec::new();
            }
            let same = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| equal(x, y));
            boolean(Some(same == (op == Op::Eq)))
        }
        Op::Lt | Op::Le | Op::Gt | Op::Ge => match (a.as_slice(), b.as_slice()) {
            ([x], [y]) => boolean(order(x, y).map(|o| match op {
                Op::Lt => o == Ordering::Less,
                Op::Le => o != Ordering::Greater,
                Op::Gt => o == Ordering::Greater,
                _ => o != Ordering::Less,
            })),
            _ => Vec::new(),
        },
        Op::In => match a.as_slice() {
            [] => Vec::new(),
            [x] => boolean(Some(b.iter().any(|y| equal(x, y)))),
            _ => Vec::new(),
        },
        Op::And => boolean(match (truth(&a), truth(&b)) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        }),
        Op::Or => boolean(match (truth(&a), truth(&b)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        }),
        Op::Xor => boolean(match (truth(&a), truth(&b)) {
            (Some(x), Some(y)) => Some(x != y),
            _ => None,
        }),
        Op::Implies => boolean(match (truth(&a), truth(&b)) {
            (Some(false), _) | (_, Some(true)) => Some(true),
            (Some(true), Some(false)) => Some(false),
            (None, Some(false)) | (Some(true), None) | (None, None) => None,
        }),
    }
}

/// Evaluates on a resource; the resource passes only when the result is
/// `true` (an empty result does not pass).
pub fn matches(e: &Expr, resource: &Value) -> bool {
    truth(&eval(e, std::slice::from_ref(resource))) == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(expr: &str, want: bool) {
        let res = json!({
            "resourceType": "Patient",
            "active": true,
            "gender": "female",
            "name": [{"family": "Otieno", "given": ["Akinyi", "B"]}],
            "address": [{"city": "Kisumu"}, {"city": "Nairobi"}],
            "multipleBirthInteger": 2,
        });
        let e = parse(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
        assert_eq!(matches(&e, &res), want, "{expr}");
    }

    #[test]
    fn evaluates() {
        check("active", true);
        check("Patient.active = true", true);
        check("Observation.status = 'final'", false);
        check("gender = 'female' and name.family = 'Otieno'", true);
        check(
            "gender = 'male' or address.city.first().contains('Kis')",
            true,
        );
        check("address.where(city = 'Kisumu').exists()", true);
        check("address.city.first() = 'Kisumu'", true);
        check("'Nairobi' in address.city", true);
        check("gender in ('male' | 'other')", false);
        check("name.given.count() = 2", true);
        check(
            "multipleBirthInteger >= 2 and multipleBirthInteger < 3",
            true,
        );
        check("deceasedBoolean.exists().not()", true);
        check("deceasedBoolean = true", false);
        check("telecom.empty()", true);
        check("name.family.startsWith('Oti')", true);
        check("(gender = 'male') implies active", true);
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        for bad in ["", "a =", "name.resolve()", "a.'x'", "f(", "a ~ b", "'open"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
