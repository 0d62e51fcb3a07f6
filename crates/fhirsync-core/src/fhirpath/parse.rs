//! FHIRPath text to syntax tree: lexer and precedence-climbing parser.

use rust_decimal::Decimal;

use super::funcs;
use super::value::{is_calendar_word, parse_decimal, Item, Temporal};
use super::Error;

/// A parsed expression.
#[derive(Debug, Clone)]
pub enum Expr {
    /// `{}`
    Empty,
    Lit(Item<'static>),
    /// A name at the start of a path: a member of the input, or the input
    /// itself when it is a resource of that type.
    Ident(String),
    /// `%name`
    Var(String),
    This,
    Index,
    Total,
    Member(Box<Expr>, String),
    /// A function; without a target it applies to the input.
    Call(Option<Box<Expr>>, String, Vec<Expr>),
    Indexer(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Bin(Op, Box<Expr>, Box<Expr>),
    /// `is` (true) / `as` (false) with a type name.
    Type(bool, Box<Expr>, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Mul,
    Div,
    IntDiv,
    Mod,
    Add,
    Sub,
    Concat,
    Union,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    Equiv,
    NotEquiv,
    In,
    Contains,
    And,
    Or,
    Xor,
    Implies,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A back-quoted identifier: never a keyword.
    Quoted(String),
    Str(String),
    Num(String),
    /// `@...` date, date-time or time
    At(String),
    Var(String),
    Sym(&'static str),
}

const SYMS: &[&str] = &[
    "<=", ">=", "!=", "!~", "(", ")", "[", "]", "{", "}", ".", ",", "=", "~", "<", ">", "+", "-",
    "*", "/", "|", "&",
];

fn syntax(m: impl Into<String>) -> Error {
    Error::Syntax(m.into())
}

fn lex(s: &str) -> Result<Vec<Tok>, Error> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let quoted = |i: &mut usize, q: u8| -> Result<String, Error> {
        let mut v = String::new();
        *i += 1;
        loop {
            match b.get(*i) {
                None => return Err(syntax("unterminated string or identifier")),
                Some(c) if *c == q => break,
                Some(b'\\') => {
                    // The escaped character may be any character, several
                    // bytes long: step over all of it.
                    let e = s
                        .get(*i + 1..)
                        .and_then(|rest| rest.chars().next())
                        .ok_or_else(|| syntax("unterminated escape"))?;
                    *i += 1 + e.len_utf8();
                    v.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        'f' => '\u{c}',
                        'u' => {
                            let hex = s.get(*i..*i + 4).ok_or_else(|| syntax("bad \\u escape"))?;
                            *i += 4;
                            u32::from_str_radix(hex, 16)
                                .ok()
                                .and_then(char::from_u32)
                                .ok_or_else(|| syntax("bad \\u escape"))?
                        }
                        other => other,
                    });
                }
                Some(_) => {
                    let ch = s[*i..].chars().next().ok_or_else(|| syntax("bad text"))?;
                    v.push(ch);
                    *i += ch.len_utf8();
                }
            }
        }
        *i += 1;
        Ok(v)
    };
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if s[i..].starts_with("//") {
            i = s[i..].find('\n').map(|n| i + n).unwrap_or(b.len());
        } else if s[i..].starts_with("/*") {
            let end = s[i + 2..]
                .find("*/")
                .ok_or_else(|| syntax("unterminated comment"))?;
            i += end + 4;
        } else if c == b'\'' {
            out.push(Tok::Str(quoted(&mut i, b'\'')?));
        } else if c == b'`' {
            out.push(Tok::Quoted(quoted(&mut i, b'`')?));
        } else if c.is_ascii_digit() {
            let st = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            if i < b.len() && b[i] == b'L' {
                i += 1;
            }
            out.push(Tok::Num(s[st..i].to_owned()));
        } else if c == b'@' {
            let st = i + 1;
            i += 1;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric()
                    || matches!(b[i], b'-' | b':' | b'+')
                    || (b[i] == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)))
            {
                i += 1;
            }
            out.push(Tok::At(s[st..i].to_owned()));
        } else if c == b'%' {
            i += 1;
            if b.get(i) == Some(&b'`') {
                out.push(Tok::Var(quoted(&mut i, b'`')?));
            } else if b.get(i) == Some(&b'\'') {
                out.push(Tok::Var(quoted(&mut i, b'\'')?));
            } else {
                let st = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'-')) {
                    i += 1;
                }
                if st == i {
                    return Err(syntax("'%' without a name"));
                }
                out.push(Tok::Var(s[st..i].to_owned()));
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b'$' {
            let st = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(s[st..i].to_owned()));
        } else {
            let sym = SYMS
                .iter()
                .find(|x| s[i..].starts_with(**x))
                .ok_or_else(|| {
                    syntax(format!(
                        "unexpected '{}'",
                        &s[i..].chars().next().unwrap_or(' ')
                    ))
                })?;
            i += sym.len();
            out.push(Tok::Sym(sym));
        }
    }
    Ok(out)
}

struct P {
    t: Vec<Tok>,
    i: usize,
    /// Sub-expressions being parsed inside each other (parentheses,
    /// arguments, indexers, unary minus).
    nest: usize,
}

/// Longest expression text, in bytes.
pub const EXPRESSION_BYTES_MAX: usize = 16 * 1024;
/// Deepest syntax tree: every form of nesting counts (parentheses,
/// arguments as in `where(where(...))`, chains as in `.not().not()...`,
/// runs of one operator as in `a | b | c ...`), so evaluating and dropping
/// a tree never recurses deeper than this.
pub const DEPTH_MAX: usize = 128;
/// Most sub-expressions inside each other (parentheses, arguments,
/// indexers, signs), which the parser reads by recursion.
pub const NEST_MAX: usize = 32;

fn too_deep() -> Error {
    syntax(format!(
        "the expression's tree is deeper than {DEPTH_MAX} levels (DEPTH_MAX)"
    ))
}

fn too_nested() -> Error {
    syntax(format!(
        "the expression nests more than {NEST_MAX} sub-expressions inside each other (NEST_MAX)"
    ))
}

/// A tree and its height.
type H = (Expr, usize);

const LEVELS: &[&[(&str, Op)]] = &[
    &[("implies", Op::Implies)],
    &[("or", Op::Or), ("xor", Op::Xor)],
    &[("and", Op::And)],
    &[("in", Op::In), ("contains", Op::Contains)],
    &[
        ("=", Op::Eq),
        ("~", Op::Equiv),
        ("!=", Op::Ne),
        ("!~", Op::NotEquiv),
    ],
    &[("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)],
    &[("|", Op::Union)],
    // 7: is / as (handled in `level`)
    &[],
    &[("+", Op::Add), ("-", Op::Sub), ("&", Op::Concat)],
    &[
        ("*", Op::Mul),
        ("/", Op::Div),
        ("div", Op::IntDiv),
        ("mod", Op::Mod),
    ],
];

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i)
    }

    fn is_op(&self, w: &str) -> bool {
        match self.peek() {
            Some(Tok::Sym(s)) => *s == w,
            Some(Tok::Ident(s)) => s == w && w.chars().all(|c| c.is_ascii_alphabetic()),
            _ => false,
        }
    }

    fn expect(&mut self, s: &str) -> Result<(), Error> {
        if self.is_op(s) {
            self.i += 1;
            Ok(())
        } else {
            Err(syntax(format!("expected '{s}'")))
        }
    }

    /// A node of height `h`, refused past [`DEPTH_MAX`].
    fn node(&self, e: Expr, h: usize) -> Result<H, Error> {
        if h > DEPTH_MAX {
            return Err(too_deep());
        }
        Ok((e, h))
    }

    /// A whole sub-expression (in parentheses, an argument, an index).
    fn nested(&mut self) -> Result<H, Error> {
        self.nest += 1;
        if self.nest > NEST_MAX {
            return Err(too_nested());
        }
        let r = self.level(0);
        self.nest -= 1;
        r
    }

    fn level(&mut self, n: usize) -> Result<H, Error> {
        if n == LEVELS.len() {
            return self.unary();
        }
        let (mut left, mut h) = self.level(n + 1)?;
        loop {
            if n == 7 {
                let is = if self.is_op("is") {
                    true
                } else if self.is_op("as") {
                    false
                } else {
                    break;
                };
                self.i += 1;
                let ty = self.type_name()?;
                (left, h) = self.node(Expr::Type(is, Box::new(left), ty), h + 1)?;
                continue;
            }
            let Some(op) = LEVELS[n].iter().find(|(w, _)| self.is_op(w)).map(|x| x.1) else {
                break;
            };
            self.i += 1;
            let (right, hr) = self.level(n + 1)?;
            (left, h) = self.node(
                Expr::Bin(op, Box::new(left), Box::new(right)),
                h.max(hr) + 1,
            )?;
        }
        Ok((left, h))
    }

    fn type_name(&mut self) -> Result<String, Error> {
        let mut name = self.ident()?;
        while self.is_op(".") {
            self.i += 1;
            name = format!("{name}.{}", self.ident()?);
        }
        Ok(name)
    }

    fn ident(&mut self) -> Result<String, Error> {
        match self.peek().cloned() {
            Some(Tok::Ident(s)) | Some(Tok::Quoted(s)) => {
                self.i += 1;
                Ok(s)
            }
            _ => Err(syntax("expected a name")),
        }
    }

    fn unary(&mut self) -> Result<H, Error> {
        if self.is_op("-") || self.is_op("+") {
            let minus = self.is_op("-");
            self.i += 1;
            self.nest += 1;
            if self.nest > NEST_MAX {
                return Err(too_nested());
            }
            let r = self.unary();
            self.nest -= 1;
            let (e, h) = r?;
            if !minus {
                return Ok((e, h));
            }
            return match e {
                Expr::Lit(Item::Int(i)) => Ok((Expr::Lit(Item::Int(-i)), h)),
                Expr::Lit(Item::Dec(d)) => Ok((Expr::Lit(Item::Dec(-d)), h)),
                Expr::Lit(Item::Qty(d, u)) => Ok((Expr::Lit(Item::Qty(-d, u)), h)),
                e => self.node(Expr::Neg(Box::new(e)), h + 1),
            };
        }
        let (mut e, mut h) = self.term()?;
        loop {
            if self.is_op(".") {
                self.i += 1;
                let name = self.ident()?;
                (e, h) = if self.is_op("(") {
                    let (args, ha) = self.args(&name)?;
                    self.node(Expr::Call(Some(Box::new(e)), name, args), h.max(ha) + 1)?
                } else {
                    self.node(Expr::Member(Box::new(e), name), h + 1)?
                };
            } else if self.is_op("[") {
                self.i += 1;
                let (ix, hi) = self.nested()?;
                self.expect("]")?;
                (e, h) = self.node(Expr::Indexer(Box::new(e), Box::new(ix)), h.max(hi) + 1)?;
            } else {
                return Ok((e, h));
            }
        }
    }

    /// A call's arguments and the height of the highest.
    fn args(&mut self, name: &str) -> Result<(Vec<Expr>, usize), Error> {
        self.expect("(")?;
        let mut args = Vec::new();
        let mut h = 0;
        if !self.is_op(")") {
            loop {
                let (a, ha) = self.nested()?;
                args.push(a);
                h = h.max(ha);
                if self.is_op(",") {
                    self.i += 1;
                } else {
                    break;
                }
            }
        }
        self.expect(")")?;
        funcs::check(name, args.len())?;
        Ok((args, h))
    }

    fn term(&mut self) -> Result<H, Error> {
        let t = self
            .peek()
            .cloned()
            .ok_or_else(|| syntax("unexpected end of expression"))?;
        self.i += 1;
        Ok((
            match t {
                Tok::Str(s) => Expr::Lit(Item::Str(s)),
                Tok::Num(n) => {
                    let unit = match self.peek().cloned() {
                        Some(Tok::Str(u)) => Some(u),
                        Some(Tok::Ident(w)) if is_calendar_word(&w) => Some(w),
                        _ => None,
                    };
                    if let Some(u) = unit {
                        self.i += 1;
                        let d = parse_decimal(&n).ok_or_else(|| syntax("bad number"))?;
                        Expr::Lit(Item::Qty(d, u))
                    } else if let Some(l) = n.strip_suffix('L') {
                        Expr::Lit(Item::Int(l.parse().map_err(|_| syntax("bad integer"))?))
                    } else if n.contains('.') {
                        Expr::Lit(Item::Dec(
                            n.parse::<Decimal>().map_err(|_| syntax("bad decimal"))?,
                        ))
                    } else {
                        Expr::Lit(Item::Int(
                            n.parse().map_err(|_| syntax("integer out of range"))?,
                        ))
                    }
                }
                Tok::At(a) => Expr::Lit(temporal(&a)?),
                Tok::Var(v) => Expr::Var(v),
                Tok::Sym("(") => {
                    let (e, h) = self.nested()?;
                    self.expect(")")?;
                    return Ok((e, h));
                }
                Tok::Sym("{") => {
                    self.expect("}")?;
                    Expr::Empty
                }
                Tok::Ident(w) if w == "true" || w == "false" => Expr::Lit(Item::Bool(w == "true")),
                Tok::Ident(w) if w == "$this" => Expr::This,
                Tok::Ident(w) if w == "$index" => Expr::Index,
                Tok::Ident(w) if w == "$total" => Expr::Total,
                Tok::Ident(w) if w.starts_with('$') => {
                    return Err(syntax(format!("unknown '{w}'")))
                }
                Tok::Ident(w) | Tok::Quoted(w) => {
                    if self.is_op("(") {
                        let (args, h) = self.args(&w)?;
                        return self.node(Expr::Call(None, w, args), h + 1);
                    } else {
                        Expr::Ident(w)
                    }
                }
                Tok::Sym(s) => return Err(syntax(format!("unexpected '{s}'"))),
            },
            1,
        ))
    }
}

fn temporal(a: &str) -> Result<Item<'static>, Error> {
    let bad = || syntax(format!("bad date/time literal '@{a}'"));
    if let Some(t) = a.strip_prefix('T') {
        return Temporal::parse_time(t).map(Item::Time).ok_or_else(bad);
    }
    if a.contains('T') {
        return Temporal::parse_datetime(a)
            .map(Item::DateTime)
            .ok_or_else(bad);
    }
    Temporal::parse_date(a).map(Item::Date).ok_or_else(bad)
}

/// Parses an expression; unknown functions and wrong argument counts are
/// refused here, never at evaluation time.
pub fn parse(s: &str) -> Result<Expr, Error> {
    if s.len() > EXPRESSION_BYTES_MAX {
        return Err(syntax(format!(
            "the expression is {} bytes long, more than {EXPRESSION_BYTES_MAX} (EXPRESSION_BYTES_MAX)",
            s.len()
        )));
    }
    let mut p = P {
        t: lex(s)?,
        i: 0,
        nest: 0,
    };
    if p.t.is_empty() {
        return Err(syntax("empty expression"));
    }
    let (e, _) = p.level(0)?;
    if p.i != p.t.len() {
        return Err(syntax(format!("unexpected {:?}", p.t[p.i])));
    }
    Ok(e)
}
