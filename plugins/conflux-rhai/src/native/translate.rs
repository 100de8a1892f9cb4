//! Translation: a Rhai syntax tree becomes a native plan, once, at build
//! time. Anything outside the subset (functions, loops, calls, a read after
//! a write to the same field, ...) gives `None`, and the script stays
//! interpreted.

use std::borrow::Cow;

use conflux_json::path::TextScan;
use rhai::{ASTFlags, Expr, ImmutableString, Stmt, AST};

use super::{Arith, Cmp, Ending, Native, Node, Path, Slots, Step, Target, Val};
use crate::limits::Limits;

/// Most nodes a translated script may have. A run takes at most one
/// operation per node, so with `max_operations` at least four times this
/// the native run never does work Rhai would refuse.
const MAX_NODES: usize = 256;

/// Longest string a native run handles.
const MAX_STRING: usize = 4096;

/// Builds the native form while walking Rhai's syntax tree.
struct Translator {
    /// Visible `let` names with their slots, innermost last.
    scope: Vec<(ImmutableString, usize)>,
    slots: usize,
    /// Every path written so far, in program order.
    written: Vec<Path>,
    nodes: usize,
    scan: Option<TextScan>,
}

/// Whether one path is a prefix of the other (or equal).
fn overlaps(a: &[ImmutableString], b: &[ImmutableString]) -> bool {
    a.iter().zip(b).all(|(x, y)| x == y)
}

fn max_string(limits: &Limits) -> usize {
    MAX_STRING.min(limits.max_string_size)
}

impl Translator {
    fn new(ast: &AST, limits: &Limits) -> Option<Self> {
        if ast.has_functions() || limits.max_operations < 4 * MAX_NODES as u64 {
            return None;
        }
        Some(Translator { scope: Vec::new(), slots: 0, written: Vec::new(), nodes: 0, scan: Some(TextScan::default()) })
    }

    fn count(&mut self) -> Option<()> {
        self.nodes += 1;
        (self.nodes <= MAX_NODES).then_some(())
    }

    fn is_event(expr: &Expr) -> bool {
        matches!(expr, Expr::Variable(v, ..) if v.1 == "event" && v.2.is_empty())
    }

    /// The field path of `event.a["b"].c`, or None for anything else.
    fn path(expr: &Expr) -> Option<Vec<ImmutableString>> {
        match expr {
            Expr::Dot(bin, flags, _) if !flags.contains(ASTFlags::NEGATED) && Self::is_event(&bin.lhs) => {
                let mut path = Vec::new();
                Self::chain(&bin.rhs, &mut path)?;
                Some(path)
            }
            Expr::Index(bin, flags, _) if !flags.contains(ASTFlags::NEGATED) => {
                let mut path = if Self::is_event(&bin.lhs) { Vec::new() } else { Self::path(&bin.lhs)? };
                match &bin.rhs {
                    Expr::StringConstant(name, _) => path.push(name.clone()),
                    _ => return None,
                }
                Some(path)
            }
            _ => None,
        }
    }

    /// The rest of a property chain after `event`.
    fn chain(expr: &Expr, path: &mut Vec<ImmutableString>) -> Option<()> {
        match expr {
            Expr::Property(p, _) => path.push(p.2.clone()),
            Expr::Dot(bin, flags, _) if !flags.contains(ASTFlags::NEGATED) => {
                Self::chain(&bin.lhs, path)?;
                Self::chain(&bin.rhs, path)?;
            }
            Expr::Index(bin, flags, _) if !flags.contains(ASTFlags::NEGATED) => {
                Self::chain(&bin.lhs, path)?;
                match &bin.rhs {
                    Expr::StringConstant(name, _) => path.push(name.clone()),
                    _ => return None,
                }
            }
            _ => return None,
        }
        Some(())
    }

    fn expr(&mut self, expr: &Expr) -> Option<Node> {
        self.count()?;
        Some(match expr {
            Expr::BoolConstant(b, _) => Node::Const(Val::Bool(*b)),
            Expr::IntegerConstant(i, _) => Node::Const(Val::Int(*i)),
            Expr::FloatConstant(f, _) => Node::Const(Val::Float(**f)),
            Expr::StringConstant(s, _) => Node::Const(Val::Str(Cow::Owned(s.to_string()))),
            Expr::Unit(_) => Node::Const(Val::Unit),
            Expr::Variable(v, ..) if v.2.is_empty() => {
                let slot = self.scope.iter().rev().find(|(name, _)| *name == v.1)?.1;
                Node::Local(slot)
            }
            Expr::Dot(..) | Expr::Index(..) => self.read(Self::path(expr)?)?,
            Expr::And(items, _) => Node::And(items.iter().map(|e| self.expr(e)).collect::<Option<_>>()?),
            Expr::Or(items, _) => Node::Or(items.iter().map(|e| self.expr(e)).collect::<Option<_>>()?),
            Expr::FnCall(call, _) if call.is_operator_call() && call.namespace.is_empty() => {
                let mut args = call.args.iter().map(|e| self.expr(e).map(Box::new));
                match (call.name.as_str(), call.args.len()) {
                    ("!", 1) => Node::Not(args.next()??),
                    ("-", 1) => Node::Neg(args.next()??),
                    (op, 2) => {
                        let (a, b) = (args.next()??, args.next()??);
                        match op {
                            "==" => Node::Cmp(Cmp::Eq, a, b),
                            "!=" => Node::Cmp(Cmp::Ne, a, b),
                            "<" => Node::Cmp(Cmp::Lt, a, b),
                            "<=" => Node::Cmp(Cmp::Le, a, b),
                            ">" => Node::Cmp(Cmp::Gt, a, b),
                            ">=" => Node::Cmp(Cmp::Ge, a, b),
                            "+" => Node::Arith(Arith::Add, a, b),
                            "-" => Node::Arith(Arith::Sub, a, b),
                            "*" => Node::Arith(Arith::Mul, a, b),
                            "/" => Node::Arith(Arith::Div, a, b),
                            _ => return None,
                        }
                    }
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// Statements in order, no-ops left out.
    fn statements(&mut self, stmts: &[Stmt]) -> Option<Vec<Step>> {
        let steps = stmts.iter().map(|s| self.stmt(s)).collect::<Option<Vec<_>>>()?;
        Some(steps.into_iter().flatten().collect())
    }

    /// A block: its `let`s end with it.
    fn block(&mut self, stmts: &[Stmt]) -> Option<Vec<Step>> {
        let depth = self.scope.len();
        let steps = self.statements(stmts)?;
        self.scope.truncate(depth);
        Some(steps)
    }

    /// A read of a field, unless this run wrote over it before (writes land
    /// after the run, so the read would see the old value).
    fn read(&mut self, path: Vec<ImmutableString>) -> Option<Node> {
        if self.written.iter().any(|w| overlaps(w, &path)) {
            return None;
        }
        let slots = self.slots_of(&path);
        Some(Node::Read(path.into(), slots))
    }

    /// Scan slots for a path and its parents; a path the scan cannot take
    /// turns the scan off (runs then look fields up one by one).
    fn slots_of(&mut self, path: &[ImmutableString]) -> Slots {
        let Some(scan) = self.scan.as_mut() else { return Slots::default() };
        let value = scan.value(path);
        let parents: Option<Box<[usize]>> = (1..path.len()).map(|n| scan.value(&path[..n])).collect();
        match (value, parents) {
            (Some(value), Some(parents)) => Slots { value, parents },
            _ => {
                self.scan = None;
                Slots::default()
            }
        }
    }

    /// The close slot of the object a write lands in.
    fn close_of(&mut self, parents: &[ImmutableString]) -> usize {
        match self.scan.as_mut().map(|scan| scan.close(parents)) {
            Some(Some(slot)) => slot,
            Some(None) => {
                self.scan = None;
                0
            }
            None => 0,
        }
    }

    /// One statement; `None` inside means "nothing to do" (a no-op).
    fn stmt(&mut self, stmt: &Stmt) -> Option<Option<Step>> {
        self.count()?;
        Some(Some(match stmt {
            Stmt::Noop(_) => return Some(None),
            Stmt::Var(var, ..) => {
                let (ident, value, _) = &**var;
                if ident.name == "event" || ident.name == "meta" {
                    return None;
                }
                let node = self.expr(value)?;
                let slot = self.slots;
                self.slots += 1;
                self.scope.push((ident.name.clone(), slot));
                Step::Let(slot, node)
            }
            Stmt::Assignment(assign) => {
                let (op, bin) = &**assign;
                let path = Self::path(&bin.lhs)?;
                if path.is_empty() {
                    return None;
                }
                let value = self.expr(&bin.rhs)?;
                let value = match op.get_op_assignment_info() {
                    None => value,
                    Some((.., token, _)) => {
                        let arith = match token.literal_syntax() {
                            "+" => Arith::Add,
                            "-" => Arith::Sub,
                            "*" => Arith::Mul,
                            "/" => Arith::Div,
                            _ => return None,
                        };
                        Node::Arith(arith, Box::new(self.read(path.clone())?), Box::new(value))
                    }
                };
                // Later writes must not create or replace an object an
                // earlier write goes through (writes land after the run).
                if self.written.iter().any(|w| overlaps(w, &path) && **w != *path) {
                    return None;
                }
                self.written.push(path.clone().into());
                let slots = self.slots_of(&path);
                let close = self.close_of(&path[..path.len() - 1]);
                Step::Write(Target { path: path.into(), slots, close }, value)
            }
            Stmt::If(flow, _) => {
                let condition = self.expr(&flow.expr)?;
                let then = self.block(flow.body.statements())?;
                let otherwise = self.block(flow.branch.statements())?;
                Step::If(condition, then, otherwise)
            }
            Stmt::Return(None, flags, _) if flags.is_empty() => Step::Finish(Ending::Drop),
            Stmt::Return(Some(e), flags, _) if flags.is_empty() => Step::Finish(Self::ending(e)?),
            _ => return None,
        }))
    }

    /// What returning this expression means for the event, if simple.
    fn ending(expr: &Expr) -> Option<Ending> {
        match expr {
            e if Self::is_event(e) => Some(Ending::Event),
            Expr::Unit(_) => Some(Ending::Drop),
            _ => None,
        }
    }

    /// A block whose value is the script's result (the end of the script,
    /// or a branch of an `if` there).
    fn tail_block(&mut self, stmts: &[Stmt]) -> Option<Vec<Step>> {
        let depth = self.scope.len();
        let Some((last, body)) = stmts.split_last() else { return Some(Vec::new()) };
        let mut steps = self.statements(body)?;
        match last {
            Stmt::Expr(e) => steps.push(Step::Finish(Self::ending(e)?)),
            Stmt::If(flow, _) => {
                self.count()?;
                let condition = self.expr(&flow.expr)?;
                let then = self.tail_block(flow.body.statements())?;
                let otherwise = self.tail_block(flow.branch.statements())?;
                steps.push(Step::If(condition, then, otherwise));
            }
            // Any other final statement leaves `()`: running off the end.
            other => steps.extend(self.stmt(other)?),
        }
        self.scope.truncate(depth);
        Some(steps)
    }
}

impl Native {
    /// Translates a whole script whose result is `event` or `()`; None when
    /// the script uses anything outside the native subset.
    pub fn script(ast: &AST, limits: &Limits) -> Option<Native> {
        let mut t = Translator::new(ast, limits)?;
        let steps = t.tail_block(ast.statements())?;
        Some(Native { steps, value: None, slots: t.slots, max_string: max_string(limits), scan: t.scan })
    }

    /// Translates a condition (one expression).
    pub fn expression(ast: &AST, limits: &Limits) -> Option<Native> {
        let mut t = Translator::new(ast, limits)?;
        let value = match ast.statements() {
            [Stmt::Expr(e)] => t.expr(e)?,
            [Stmt::FnCall(call, pos)] => t.expr(&Expr::FnCall(call.clone(), *pos))?,
            _ => return None,
        };
        Some(Native { steps: Vec::new(), value: Some(value), slots: 0, max_string: max_string(limits), scan: t.scan })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::Script;

    #[test]
    fn scripts_outside_the_subset_stay_interpreted() {
        let limits = Limits::default();
        for source in [
            "let e = event; e",
            "event.items.map(|i| i)",
            "fn f() { 1 } event.x = f(); event",
            "for i in 0..3 { event.n = i } event",
            "event.data.zone = \"x\"; event.z = event.data.zone; event",
            "event.data = #{}; event.data.x = 1; event",
            "event.x = hash(event.id); event",
            "#{ a: 1 }",
            "meta.x = 1; event",
            "42",
        ] {
            let script = Script::compile(source, &limits).unwrap();
            assert!(!script.is_native(), "{source} should not be native");
        }
        let tight = Limits { max_operations: 100, ..Limits::default() };
        assert!(
            !Script::compile("event", &tight).unwrap().is_native(),
            "a tight operation budget is Rhai's to enforce"
        );
    }
}
