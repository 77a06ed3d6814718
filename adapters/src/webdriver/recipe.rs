//! Recipes: the per-portal list of browser steps, loadable from TOML.

use std::collections::HashMap;
use std::path::Path;

use bulwark_workflows::adapter::{AdapterError, AdapterResult};
use bulwark_workflows::catalog::{Batch, Item};
use serde::{Deserialize, Serialize};

/// Which shape of portal a recipe drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PortalKind {
    /// One manifest file per batch; probe looks for the key in the upload history.
    #[default]
    Manifest,
    /// No bulk upload: the recipe edits each item (`for_each_item`).
    PerItem,
}

/// One column of the generated manifest CSV.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// Header cell.
    pub header: String,
    /// Cell template, e.g. `{{item.qty}}`.
    pub value: String,
}

/// How the manifest file is generated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSpec {
    /// File name template; it should carry the idempotency key (default
    /// `bulwark-{{batch.key}}.csv`).
    #[serde(default = "default_file_name")]
    pub file_name: String,
    /// Columns, in order (default: `sku,qty,price`).
    #[serde(default = "default_columns")]
    pub columns: Vec<Column>,
}

fn default_file_name() -> String {
    "bulwark-{{batch.key}}.csv".into()
}

fn default_columns() -> Vec<Column> {
    [
        ("sku", "{{item.portal_sku}}"),
        ("qty", "{{item.qty}}"),
        ("price", "{{item.price}}"),
    ]
    .into_iter()
    .map(|(h, v)| Column {
        header: h.into(),
        value: v.into(),
    })
    .collect()
}

impl Default for ManifestSpec {
    fn default() -> Self {
        Self {
            file_name: default_file_name(),
            columns: default_columns(),
        }
    }
}

/// How probe decides that a batch already landed, after running [`Recipe::probe`] steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeMatch {
    /// Selector of the candidate elements (e.g. the history table's rows).
    pub rows: String,
    /// Templates that must all appear in one candidate's text (default: the key).
    #[serde(default = "default_contains")]
    pub contains: Vec<String>,
}

fn default_contains() -> Vec<String> {
    vec!["{{batch.key}}".into()]
}

/// Which value a `read_text` step reads for the current item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// The quantity.
    Qty,
    /// The (first tier) price.
    Price,
}

/// One browser step. In TOML: a table with `action = "goto"` etc.
///
/// Every `selector` is a CSS selector. Strings called templates are rendered with
/// minijinja; they see `base_url`, `endpoint`, `batch` (`key`, `snapshot`, `index`) and,
/// inside `for_each_item` and in [`Recipe::lookup`], `item` (`sku`, `portal_sku`, `qty`,
/// `price`, `price_minor`, and `ids`: the values captured for the item so far).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Navigate to a URL (template).
    Goto {
        /// URL template.
        url: String,
    },
    /// Type into a field: either `value` (a template) or `secret` (a secret's name).
    Fill {
        /// The field.
        selector: String,
        /// Value template.
        #[serde(default)]
        value: Option<String>,
        /// Name of a secret (an environment variable by default).
        #[serde(default)]
        secret: Option<String>,
    },
    /// Click an element.
    Click {
        /// The element.
        selector: String,
    },
    /// Put the generated manifest file into a file input.
    UploadFile {
        /// The `<input type=file>`.
        selector: String,
    },
    /// Wait until an element exists (and, with `text`, contains that text). A timeout is
    /// transient.
    WaitFor {
        /// The element.
        selector: String,
        /// Text template the element must contain.
        #[serde(default)]
        text: Option<String>,
        /// Overrides the step timeout.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Wait for a success text; if `error_selector` shows up first, the portal refused the
    /// data ([`AdapterError::Rejected`], or [`AdapterError::Auth`] during login) with the
    /// text it shows.
    ExpectText {
        /// Element carrying the success message.
        selector: String,
        /// Text template it must contain.
        text: String,
        /// Element carrying the portal's validation message.
        #[serde(default)]
        error_selector: Option<String>,
        /// Overrides the step timeout.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Verify only, inside `for_each_item`: read the current item's quantity or price
    /// from an element (an input's value, or the element's text).
    ReadText {
        /// The element.
        selector: String,
        /// Which value it shows.
        field: Field,
    },
    /// Verify only: read a table of items (header names pick the columns).
    ReadTable {
        /// The `<table>`.
        selector: String,
        /// Header of the portal-SKU column.
        sku_column: String,
        /// Header of the quantity column.
        qty_column: String,
        /// Header of the price column.
        price_column: String,
    },
    /// Run the nested steps once per batch item, with `item` in scope.
    ForEachItem {
        /// The steps.
        steps: Vec<Step>,
    },
    /// Where an item is in scope ([`Recipe::lookup`], `for_each_item`): read an element's
    /// attribute (or its text) and keep it as `{{item.ids.<into>}}` for the item's later
    /// steps. Captures in `lookup` are cached per endpoint and SKU.
    ///
    /// No element within the timeout: in `lookup` the portal does not know the SKU (the
    /// item is refused, [`AdapterError::Rejected`]); elsewhere a configuration error. A
    /// value the `pattern` does not match is a configuration error.
    Capture {
        /// The element (a template: it may name the item, e.g.
        /// `tr[data-sku="{{item.portal_sku}}"] a.edit`).
        selector: String,
        /// Attribute to read (absent: the element's text).
        #[serde(default)]
        attribute: Option<String>,
        /// A regular expression with exactly one group: the value kept is the group's
        /// match (absent: the whole value, trimmed).
        #[serde(default)]
        pattern: Option<String>,
        /// Name of the variable: `{{item.ids.<into>}}`.
        into: String,
        /// Overrides the step timeout.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
}

impl Step {
    /// The action's name, as written in recipes.
    pub fn action(&self) -> &'static str {
        match self {
            Step::Goto { .. } => "goto",
            Step::Fill { .. } => "fill",
            Step::Click { .. } => "click",
            Step::UploadFile { .. } => "upload_file",
            Step::WaitFor { .. } => "wait_for",
            Step::ExpectText { .. } => "expect_text",
            Step::ReadText { .. } => "read_text",
            Step::ReadTable { .. } => "read_table",
            Step::ForEachItem { .. } => "for_each_item",
            Step::Capture { .. } => "capture",
        }
    }

    /// The step's selector, if it has one.
    pub fn selector(&self) -> Option<&str> {
        match self {
            Step::Fill { selector, .. }
            | Step::Click { selector }
            | Step::UploadFile { selector }
            | Step::WaitFor { selector, .. }
            | Step::ExpectText { selector, .. }
            | Step::ReadText { selector, .. }
            | Step::ReadTable { selector, .. }
            | Step::Capture { selector, .. } => Some(selector),
            Step::Goto { .. } | Step::ForEachItem { .. } => None,
        }
    }
}

/// A portal recipe: how to log in, upload, verify and probe, as browser steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// A name for logs and errors.
    pub name: String,
    /// Manifest or per-item portal.
    #[serde(default)]
    pub kind: PortalKind,
    /// An element present only on the portal's login page: seeing it after any step means
    /// the session expired, and the adapter logs in again.
    pub login_marker: String,
    /// Manifest generation (manifest portals).
    #[serde(default)]
    pub manifest: ManifestSpec,
    /// Log in (fill steps may use secrets). A refusal shown by `expect_text`'s
    /// `error_selector` here is an [`AdapterError::Auth`].
    pub login: Vec<Step>,
    /// Send one batch.
    pub upload: Vec<Step>,
    /// Read the batch's values back (`read_table`, or `read_text` inside `for_each_item`).
    pub verify: Vec<Step>,
    /// Steps before probe looks for the key (e.g. go to the upload history).
    #[serde(default)]
    pub probe: Vec<Step>,
    /// What probe looks for (absent: probe answers "not found" unless the adapter still
    /// knows the batch; see the docs).
    #[serde(default)]
    pub probe_match: Option<ProbeMatch>,
    /// Steps that find an item's portal ids (`capture` steps), run once per item whose
    /// ids are not cached, before its `for_each_item` steps. The ids are cached per
    /// endpoint and SKU; a SKU the lookup cannot find is refused.
    #[serde(default)]
    pub lookup: Vec<Step>,
    /// An element present only on the portal's "not found" page. Seen inside
    /// `for_each_item`: the item's cached ids went stale (they are forgotten and looked up
    /// again, once), or, with freshly looked up or no ids, the portal does not know the
    /// item (it is refused).
    #[serde(default)]
    pub not_found_marker: Option<String>,
}

impl Recipe {
    /// Parse a recipe from TOML and check it.
    pub fn from_toml(text: &str) -> AdapterResult<Self> {
        let recipe: Recipe = toml::from_str(text)
            .map_err(|e| AdapterError::Config(format!("recipe is not valid: {e}")))?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Load and check a recipe file.
    pub fn load(path: &Path) -> AdapterResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            AdapterError::Config(format!("cannot read recipe {}: {e}", path.display()))
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            AdapterError::Config(m) => AdapterError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Check the structure: fill steps name exactly one source, item-only steps sit in a
    /// loop, verify reads something, every template parses.
    pub fn validate(&self) -> AdapterResult<()> {
        let err = |m: String| Err(AdapterError::Config(format!("recipe {:?}: {m}", self.name)));
        if self.verify.is_empty() || self.upload.is_empty() {
            return err("`upload` and `verify` need at least one step".into());
        }
        for (phase, steps) in [
            ("login", &self.login),
            ("upload", &self.upload),
            ("verify", &self.verify),
            ("probe", &self.probe),
        ] {
            if let Err(m) = check_steps(phase, steps, false) {
                return err(m);
            }
        }
        if let Err(m) = check_lookup(&self.lookup) {
            return err(m);
        }
        if !self.lookup.is_empty()
            && ![&self.upload, &self.verify, &self.probe]
                .iter()
                .any(|steps| steps.iter().any(|s| matches!(s, Step::ForEachItem { .. })))
        {
            return err(
                "`lookup` runs per item: upload, verify or probe needs a for_each_item".into(),
            );
        }
        if let Some(m) = &self.not_found_marker
            && m.trim().is_empty()
        {
            return err("`not_found_marker` is an empty selector".into());
        }
        if !contains_read(&self.verify) {
            return err("`verify` must contain a read_table or read_text step".into());
        }
        let mut templates: Vec<&str> = vec![&self.manifest.file_name];
        collect_capture_selectors(&self.lookup, &mut templates);
        for steps in [&self.upload, &self.verify, &self.probe] {
            collect_capture_selectors(steps, &mut templates);
        }
        templates.extend(self.manifest.columns.iter().map(|c| c.value.as_str()));
        if let Some(m) = &self.probe_match {
            templates.extend(m.contains.iter().map(String::as_str));
        }
        for t in templates {
            if let Err(e) = minijinja::Environment::new().template_from_str(t) {
                return err(format!("template {t:?} does not parse: {e}"));
            }
        }
        Ok(())
    }

    /// Names of the ids the lookup captures (`into`), in order, without repeats.
    pub fn lookup_ids(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for s in &self.lookup {
            if let Step::Capture { into, .. } = s
                && !out.contains(&into.as_str())
            {
                out.push(into);
            }
        }
        out
    }
}

fn collect_capture_selectors<'a>(steps: &'a [Step], out: &mut Vec<&'a str>) {
    for s in steps {
        match s {
            Step::Capture { selector, .. } => out.push(selector),
            Step::ForEachItem { steps } => collect_capture_selectors(steps, out),
            _ => {}
        }
    }
}

fn check_lookup(steps: &[Step]) -> Result<(), String> {
    check_steps("lookup", steps, true)?;
    for (i, s) in steps.iter().enumerate() {
        let at = format!("lookup step {} ({})", i + 1, s.action());
        match s {
            Step::ForEachItem { .. } => {
                return Err(format!("{at}: lookup steps already run per item"));
            }
            Step::ReadText { .. } | Step::ReadTable { .. } | Step::UploadFile { .. } => {
                return Err(format!("{at}: not a lookup step"));
            }
            _ => {}
        }
    }
    if !steps.is_empty() && !steps.iter().any(|s| matches!(s, Step::Capture { .. })) {
        return Err("`lookup` needs a capture step (it finds the item's ids)".into());
    }
    Ok(())
}

/// Check a capture's variable name and pattern.
fn check_capture(at: &str, into: &str, pattern: Option<&str>) -> Result<(), String> {
    let mut chars = into.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !plain {
        return Err(format!(
            "{at}: `into` must be a plain name (letters, digits, `_`), got {into:?}"
        ));
    }
    if let Some(p) = pattern {
        let re = regex::Regex::new(p).map_err(|e| format!("{at}: pattern {p:?}: {e}"))?;
        if re.captures_len() != 2 {
            return Err(format!(
                "{at}: pattern {p:?} needs exactly one group `(...)`, it has {}",
                re.captures_len() - 1
            ));
        }
    }
    Ok(())
}

fn contains_read(steps: &[Step]) -> bool {
    steps.iter().any(|s| match s {
        Step::ReadTable { .. } | Step::ReadText { .. } => true,
        Step::ForEachItem { steps } => contains_read(steps),
        _ => false,
    })
}

fn check_steps(phase: &str, steps: &[Step], in_loop: bool) -> Result<(), String> {
    for (i, s) in steps.iter().enumerate() {
        let at = format!("{phase} step {} ({})", i + 1, s.action());
        match s {
            Step::Fill { value, secret, .. } if value.is_some() == secret.is_some() => {
                return Err(format!("{at}: give exactly one of `value` or `secret`"));
            }
            Step::ReadText { .. } if !in_loop => {
                return Err(format!("{at}: read_text belongs inside for_each_item"));
            }
            Step::ForEachItem { steps } => {
                if in_loop {
                    return Err(format!("{at}: loops do not nest"));
                }
                check_steps(&format!("{at} >"), steps, true)?;
            }
            Step::Capture { .. } if !in_loop => {
                return Err(format!(
                    "{at}: capture needs an item: use it in `lookup` or inside for_each_item"
                ));
            }
            Step::Capture { into, pattern, .. } => check_capture(&at, into, pattern.as_deref())?,
            _ => {}
        }
        if let Some(sel) = s.selector()
            && sel.trim().is_empty()
        {
            return Err(format!("{at}: empty selector"));
        }
    }
    Ok(())
}

/// An item's portal ids (captured by `capture` steps), by variable name.
pub(crate) type Ids = std::collections::BTreeMap<String, String>;

/// The template context of one item.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ItemCtx {
    pub(crate) sku: String,
    pub(crate) portal_sku: String,
    pub(crate) qty: i64,
    pub(crate) price: String,
    pub(crate) price_minor: i64,
    /// Values captured for the item (`{{item.ids.id}}`).
    pub(crate) ids: Ids,
}

impl ItemCtx {
    pub(crate) fn new(item: &Item, sku_prefix: &str) -> Self {
        let price_minor = item.tiers.first().map(|t| t.price_minor).unwrap_or(0);
        Self {
            sku: item.sku.clone(),
            portal_sku: format!("{sku_prefix}{}", item.sku),
            qty: item.qty,
            price: price_text(price_minor),
            price_minor,
            ids: Ids::new(),
        }
    }
}

/// Cents as a decimal amount (`1205` → `12.05`).
pub fn price_text(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let m = minor.unsigned_abs();
    format!("{sign}{}.{:02}", m / 100, m % 100)
}

/// Parse a decimal amount shown by a portal into cents (`"1,234.5"`, `"€ 12.05"` ...).
pub fn parse_price(text: &str) -> Option<i64> {
    let cleaned: String = text
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
        .collect();
    let (neg, body) = match cleaned.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, cleaned.as_str()),
    };
    let (whole, frac) = body.split_once('.').unwrap_or((body, ""));
    if whole.is_empty() || frac.len() > 2 || frac.contains('.') {
        return None;
    }
    let v = whole.parse::<i64>().ok()? * 100 + format!("{frac:0<2}").parse::<i64>().ok()?;
    Some(if neg { -v } else { v })
}

/// The template context of a batch.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BatchCtx {
    pub(crate) key: String,
    pub(crate) snapshot: Option<i64>,
    pub(crate) index: Option<u32>,
}

impl BatchCtx {
    pub(crate) fn new(batch: &Batch) -> Self {
        Self {
            key: batch.key.to_string(),
            snapshot: Some(batch.snapshot),
            index: Some(batch.index),
        }
    }

    /// Only the key is known (probe).
    pub(crate) fn from_key(key: uuid::Uuid) -> Self {
        Self {
            key: key.to_string(),
            snapshot: None,
            index: None,
        }
    }
}

/// Values available to templates.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Ctx {
    pub(crate) base_url: String,
    pub(crate) endpoint: String,
    pub(crate) batch: Option<BatchCtx>,
    pub(crate) item: Option<ItemCtx>,
}

/// Render a template strictly (an undefined variable is an error).
pub(crate) fn render(template: &str, ctx: &Ctx) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.render_str(template, ctx)
        .map_err(|e| format!("template {template:?}: {e}"))
}

/// Render the manifest CSV (file name, content) for a batch.
pub(crate) fn manifest(
    spec: &ManifestSpec,
    base: &Ctx,
    batch: &Batch,
    sku_prefix: &str,
) -> Result<(String, String), String> {
    let file_name = render(&spec.file_name, base)?;
    if file_name.contains(['/', '\\']) || file_name.starts_with('.') {
        return Err(format!(
            "manifest file name {file_name:?} is not a plain name"
        ));
    }
    let mut out = String::new();
    let headers: Vec<String> = spec.columns.iter().map(|c| csv_cell(&c.header)).collect();
    out.push_str(&headers.join(","));
    out.push('\n');
    for item in &batch.items {
        let ctx = Ctx {
            item: Some(ItemCtx::new(item, sku_prefix)),
            ..base.clone()
        };
        let cells: Result<Vec<String>, String> = spec
            .columns
            .iter()
            .map(|c| render(&c.value, &ctx).map(|v| csv_cell(&v)))
            .collect();
        out.push_str(&cells?.join(","));
        out.push('\n');
    }
    Ok((file_name, out))
}

fn csv_cell(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_owned()
    }
}

/// Values read back from the portal: portal SKU → (quantity text, price text).
pub(crate) type Observed = HashMap<String, (Option<String>, Option<String>)>;

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_workflows::catalog::PriceTier;
    use uuid::Uuid;

    const RECIPE: &str = r##"
name = "t"
login_marker = "#login-form"
[[login]]
action = "fill"
selector = "#password"
secret = "PW"
[[upload]]
action = "upload_file"
selector = "#f"
[[verify]]
action = "read_table"
selector = "#products"
sku_column = "SKU"
qty_column = "Quantity"
price_column = "Price"
"##;

    #[test]
    fn parses_and_renders_a_manifest() {
        let r = Recipe::from_toml(RECIPE).unwrap();
        let batch = Batch {
            remainder: false,
            cas: Default::default(),
            endpoint: "e".into(),
            snapshot: 3,
            index: 0,
            key: Uuid::nil(),
            items: vec![Item {
                sku: "A".into(),
                qty: 5,
                tiers: vec![PriceTier {
                    min_qty: 1,
                    price_minor: 1205,
                }],
            }],
        };
        let ctx = Ctx {
            base_url: "http://x".into(),
            endpoint: "e".into(),
            batch: Some(BatchCtx::new(&batch)),
            item: None,
        };
        let (name, csv) = manifest(&r.manifest, &ctx, &batch, "P-").unwrap();
        assert_eq!(name, format!("bulwark-{}.csv", Uuid::nil()));
        assert_eq!(csv, "sku,qty,price\nP-A,5,12.05\n");
        assert!(render("{{item.qty}}", &ctx).is_err(), "strict undefined");
    }

    #[test]
    fn rejects_bad_recipes() {
        let bad = RECIPE.replace("secret = \"PW\"", "secret = \"PW\"\nvalue = \"x\"");
        assert!(matches!(
            Recipe::from_toml(&bad),
            Err(AdapterError::Config(_))
        ));
        let bad = RECIPE.replace("action = \"read_table\"", "action = \"teleport\"");
        assert!(Recipe::from_toml(&bad).is_err());
    }

    #[test]
    fn prices() {
        assert_eq!(parse_price("12.05"), Some(1205));
        assert_eq!(parse_price("€ 1,234.5"), Some(123_450));
        assert_eq!(parse_price("x"), None);
        assert_eq!(price_text(-5), "-0.05");
    }
}
