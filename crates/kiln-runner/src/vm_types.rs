//! Which VM a job gets: its `runs-on` labels select a VM type.
//!
//! A VM type (`[vm_types.NAME]` in `kiln.toml`) is a [`VmSpec`] — image, vCPUs, memory, disk —
//! with a set of labels and a whole-run time limit. A job's `runs-on` (a label, a list of
//! labels, or `{group, labels}`, after its expressions are evaluated) selects one:
//!
//! 1. Labels compare case-insensitively, as GitHub's do.
//! 2. `self-hosted`, `linux` and `x64` describe every kiln VM; they are dropped first.
//! 3. No label left (or no `runs-on` at all): the `default` type.
//! 4. Otherwise the first type, in configuration order, whose labels include *every* label
//!    left. A type's own name is one of its labels, and GitHub's hosted Ubuntu names
//!    ([`GITHUB_UBUNTU_LABELS`]) are labels of `default` unless another type lists them.
//! 5. No such type: [`VmTypeError::NoMatch`], naming the job, its labels and the types.
//!
//! A per-workflow [`Quota`] overrides the sizes and the time limit of every type, for the runs
//! of that one workflow ([`VmTypes::with_quota`]).

use std::fmt;
use std::time::Duration;

use indexmap::IndexMap;
use kiln_vm::VmSpec;

/// Labels every kiln VM has: they never narrow the choice.
pub const GENERIC_LABELS: [&str; 3] = ["self-hosted", "linux", "x64"];

/// GitHub-hosted runner names that mean "a current Ubuntu x64 machine": labels of the `default`
/// type unless a configured type claims them.
pub const GITHUB_UBUNTU_LABELS: [&str; 4] = [
    "ubuntu-latest",
    "ubuntu-24.04",
    "ubuntu-22.04",
    "ubuntu-20.04",
];

/// The name of the type jobs get when their labels ask for nothing in particular.
pub const DEFAULT_TYPE: &str = "default";

/// One VM type: what to allocate, which labels select it, how long a run may take.
#[derive(Debug, Clone, PartialEq)]
pub struct VmType {
    /// What to ask the backend for; `spec.vm_type` is the type's name.
    pub spec: VmSpec,
    /// The labels as configured (the name and implied labels are added when matching).
    pub labels: Vec<String>,
    /// The whole-run time limit of runs on this type (`None`: none).
    pub timeout: Option<Duration>,
}

impl VmType {
    /// The type's name.
    pub fn name(&self) -> &str {
        &self.spec.vm_type
    }
}

/// A per-workflow override of the sizes and time limit (`[workflows."PATH"]`); `None` keeps
/// the selected type's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quota {
    /// vCPUs.
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u32>,
    /// Root disk size in MiB.
    pub disk_mib: Option<u32>,
    /// The whole-run time limit.
    pub timeout: Option<Duration>,
}

/// Why no VM type could be chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VmTypeError {
    /// No configured type has every label the job asks for.
    #[error(
        "Job `{job}` runs on [{}], but no VM type has all of those labels (configured: {}); \
         add them to a `[vm_types.NAME]` labels list in kiln.toml",
        .labels.join(", "),
        .types.iter().map(|(n, l)| format!("{n} [{}]", l.join(", "))).collect::<Vec<_>>().join("; ")
    )]
    NoMatch {
        /// The job id.
        job: String,
        /// Its labels, as evaluated.
        labels: Vec<String>,
        /// Every type with the labels that select it.
        types: Vec<(String, Vec<String>)>,
    },
    /// Under `isolation = "workflow"` a run has one VM, but its jobs select different types.
    #[error(
        "Job `{}` runs on VM type `{}` and job `{}` on `{}`, but isolation = \"workflow\" runs \
         every job in one VM; use --isolation job, or runs-on labels of one type",
        .first.0, .first.1, .second.0, .second.1
    )]
    Mixed {
        /// A job and its type.
        first: (String, String),
        /// A job of another type.
        second: (String, String),
    },
    /// `runs-on` did not evaluate to labels.
    #[error("Job `{job}`: `runs-on` {reason}")]
    BadRunsOn {
        /// The job id.
        job: String,
        /// What was wrong.
        reason: String,
    },
}

/// The VM types of a run, in configuration order; always has a `default` type.
#[derive(Debug, Clone, PartialEq)]
pub struct VmTypes {
    types: Vec<VmType>,
}

impl VmTypes {
    /// `types` in configuration order; a `default` type of [`VmSpec::default`]'s size and no
    /// time limit is added in front when there is none.
    pub fn new(mut types: Vec<VmType>) -> VmTypes {
        if !types.iter().any(|t| t.name() == DEFAULT_TYPE) {
            types.insert(
                0,
                VmType {
                    spec: VmSpec::default(),
                    labels: Vec::new(),
                    timeout: None,
                },
            );
        }
        VmTypes { types }
    }

    /// Only `default`, of `spec`'s size.
    pub fn single(spec: VmSpec, timeout: Option<Duration>) -> VmTypes {
        VmTypes::new(vec![VmType {
            spec: VmSpec {
                vm_type: DEFAULT_TYPE.to_owned(),
                ..spec
            },
            labels: Vec::new(),
            timeout,
        }])
    }

    /// Every type, in configuration order.
    pub fn types(&self) -> &[VmType] {
        &self.types
    }

    /// The `default` type.
    pub fn default_type(&self) -> &VmType {
        self.types
            .iter()
            .find(|t| t.name() == DEFAULT_TYPE)
            .expect("VmTypes::new always adds a default type")
    }

    /// The same types with `quota`'s values in place of each type's own.
    pub fn with_quota(&self, quota: &Quota) -> VmTypes {
        let types = self
            .types
            .iter()
            .map(|t| VmType {
                spec: VmSpec {
                    vcpus: quota.vcpus.unwrap_or(t.spec.vcpus),
                    memory_mib: quota.memory_mib.unwrap_or(t.spec.memory_mib),
                    disk_mib: quota.disk_mib.unwrap_or(t.spec.disk_mib),
                    ..t.spec.clone()
                },
                labels: t.labels.clone(),
                timeout: quota.timeout.or(t.timeout),
            })
            .collect();
        VmTypes { types }
    }

    /// The labels that select `ty`: its configured labels, its name, and for `default` the
    /// GitHub Ubuntu names no other type lists. Lower case.
    pub fn labels_of(&self, ty: &VmType) -> Vec<String> {
        let mut labels: Vec<String> = std::iter::once(ty.name())
            .chain(ty.labels.iter().map(String::as_str))
            .map(str::to_ascii_lowercase)
            .collect();
        if ty.name() == DEFAULT_TYPE {
            for name in GITHUB_UBUNTU_LABELS {
                let claimed = self.types.iter().any(|other| {
                    other.name() != DEFAULT_TYPE
                        && other.labels.iter().any(|l| l.eq_ignore_ascii_case(name))
                });
                if !claimed {
                    labels.push(name.to_owned());
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        labels.retain(|l| seen.insert(l.clone()));
        labels
    }

    /// The type for job `job` whose `runs-on` evaluated to `labels` (see the module doc).
    pub fn select(&self, job: &str, labels: &[String]) -> Result<&VmType, VmTypeError> {
        let wanted: Vec<String> = labels
            .iter()
            .map(|l| l.trim().to_ascii_lowercase())
            .filter(|l| !GENERIC_LABELS.contains(&l.as_str()))
            .collect();
        if wanted.is_empty() {
            return Ok(self.default_type());
        }
        self.types
            .iter()
            .find(|ty| {
                let offered = self.labels_of(ty);
                wanted.iter().all(|w| offered.contains(w))
            })
            .ok_or_else(|| VmTypeError::NoMatch {
                job: job.to_owned(),
                labels: labels.to_vec(),
                types: self
                    .types
                    .iter()
                    .map(|t| (t.name().to_owned(), self.labels_of(t)))
                    .collect(),
            })
    }
}

/// The configured VM types and per-workflow quotas (`[vm_types.NAME]`, `[workflows."PATH"]`).
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// The VM types.
    pub types: VmTypes,
    /// Per-workflow overrides, keyed by the workflow file's path relative to the repository
    /// root, e.g. `.github/workflows/ci.yml`.
    pub quotas: IndexMap<String, Quota>,
}

impl VmConfig {
    /// The VM types of a run of the workflow at `path` (relative to the repository root), with
    /// its quota applied when it has one.
    pub fn for_workflow(&self, path: &str) -> VmTypes {
        match self.quotas.get(normalize_workflow_key(path).as_str()) {
            Some(quota) => self.types.with_quota(quota),
            None => self.types.clone(),
        }
    }
}

/// A workflow path as a `[workflows."PATH"]` key: `/` separators, no leading `./`.
pub fn normalize_workflow_key(path: &str) -> String {
    let path = path.replace('\\', "/");
    let mut rest = path.as_str();
    while let Some(stripped) = rest.strip_prefix("./") {
        rest = stripped;
    }
    rest.to_owned()
}

/// The labels of an evaluated `runs-on`: a label, a list of labels, or `{group, labels}` (the
/// group is not used: kiln has no runner groups, so only the labels select a type).
pub fn runs_on_labels(job: &str, value: &serde_json::Value) -> Result<Vec<String>, VmTypeError> {
    let bad = |reason: String| VmTypeError::BadRunsOn {
        job: job.to_owned(),
        reason,
    };
    let label = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        other => Err(bad(format!("has a label that is not a string: {other}"))),
    };
    match value {
        serde_json::Value::String(s) => Ok(vec![s.clone()]),
        serde_json::Value::Array(items) => items.iter().map(label).collect(),
        serde_json::Value::Object(map) => {
            if let Some(key) = map
                .keys()
                .find(|k| !k.eq_ignore_ascii_case("group") && !k.eq_ignore_ascii_case("labels"))
            {
                return Err(bad(format!("has an unknown key `{key}`")));
            }
            match map.iter().find(|(k, _)| k.eq_ignore_ascii_case("labels")) {
                None | Some((_, serde_json::Value::Null)) => Ok(Vec::new()),
                Some((_, serde_json::Value::String(s))) => Ok(vec![s.clone()]),
                Some((_, serde_json::Value::Array(items))) => items.iter().map(label).collect(),
                Some((_, other)) => Err(bad(format!(
                    "labels must be a label or a list of labels, not {other}"
                ))),
            }
        }
        other => Err(bad(format!(
            "must be a label, a list of labels or {{group, labels}}, not {other}"
        ))),
    }
}

impl fmt::Display for VmType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} vCPU, {} MiB memory, {} MiB disk, image {})",
            self.name(),
            self.spec.vcpus,
            self.spec.memory_mib,
            self.spec.disk_mib,
            self.spec.image
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(name: &str, labels: &[&str], vcpus: u32) -> VmType {
        VmType {
            spec: VmSpec {
                vm_type: name.to_owned(),
                vcpus,
                ..VmSpec::default()
            },
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            timeout: None,
        }
    }

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| (*s).to_owned()).collect()
    }

    fn pick<'a>(types: &'a VmTypes, l: &[&str]) -> Result<&'a str, VmTypeError> {
        types.select("build", &labels(l)).map(VmType::name)
    }

    #[test]
    fn github_ubuntu_names_and_generic_labels_select_default() {
        let types = VmTypes::new(vec![ty("big", &["16-core"], 8)]);
        assert_eq!(pick(&types, &["ubuntu-latest"]), Ok("default"));
        assert_eq!(pick(&types, &["UBUNTU-22.04"]), Ok("default"));
        assert_eq!(
            pick(&types, &["self-hosted", "linux", "x64"]),
            Ok("default")
        );
        assert_eq!(pick(&types, &[]), Ok("default"));
        assert_eq!(pick(&types, &["default"]), Ok("default"));
    }

    #[test]
    fn every_label_must_be_offered_and_the_name_is_a_label() {
        let types = VmTypes::new(vec![
            ty("default", &[], 2),
            ty("big", &["16-core", "gpu"], 8),
        ]);
        assert_eq!(pick(&types, &["big"]), Ok("big"));
        let repeated = VmTypes::new(vec![ty("big", &["GPU", "big", "gpu"], 8)]);
        assert_eq!(repeated.labels_of(&repeated.types()[1]), ["big", "gpu"]);
        assert_eq!(pick(&types, &["self-hosted", "16-core"]), Ok("big"));
        assert_eq!(pick(&types, &["16-core", "gpu"]), Ok("big"));
        // `ubuntu-latest` is only a label of default: no type has both.
        let err = pick(&types, &["ubuntu-latest", "gpu"]).expect_err("no type has both");
        let text = err.to_string();
        assert!(text.contains("Job `build`"), "{text}");
        assert!(text.contains("[ubuntu-latest, gpu]"), "{text}");
        assert!(text.contains("big [big, 16-core, gpu]"), "{text}");
        assert!(text.contains("default [default, ubuntu-latest"), "{text}");
        assert!(pick(&types, &["macos-latest"]).is_err());
    }

    #[test]
    fn a_type_that_claims_an_ubuntu_name_takes_it_from_default() {
        let types = VmTypes::new(vec![ty("jammy", &["ubuntu-22.04"], 4)]);
        assert_eq!(pick(&types, &["ubuntu-22.04"]), Ok("jammy"));
        assert_eq!(pick(&types, &["ubuntu-24.04"]), Ok("default"));
    }

    #[test]
    fn the_first_type_in_configuration_order_wins() {
        let types = VmTypes::new(vec![ty("a", &["large"], 4), ty("b", &["large"], 8)]);
        assert_eq!(pick(&types, &["large"]), Ok("a"));
        assert_eq!(types.types()[0].name(), "default", "default is added first");
    }

    #[test]
    fn a_quota_overrides_every_type_but_keeps_what_it_leaves_out() {
        let mut big = ty("big", &[], 8);
        big.timeout = Some(Duration::from_secs(600));
        let types = VmTypes::new(vec![big]);
        let quota = Quota {
            memory_mib: Some(512),
            timeout: None,
            ..Quota::default()
        };
        let limited = types.with_quota(&quota);
        let big = limited.select("j", &labels(&["big"])).expect("big");
        assert_eq!(
            (big.spec.vcpus, big.spec.memory_mib),
            (8, 512),
            "vcpus kept"
        );
        assert_eq!(big.timeout, Some(Duration::from_secs(600)));
        assert_eq!(limited.default_type().spec.memory_mib, 512);
    }

    #[test]
    fn a_workflow_quota_applies_to_that_workflow_only() {
        let mut quotas = IndexMap::new();
        quotas.insert(
            ".github/workflows/big.yml".to_owned(),
            Quota {
                vcpus: Some(4),
                ..Quota::default()
            },
        );
        let config = VmConfig {
            types: VmTypes::new(Vec::new()),
            quotas,
        };
        let vcpus = |path| config.for_workflow(path).default_type().spec.vcpus;
        assert_eq!(vcpus("./.github/workflows/big.yml"), 4);
        assert_eq!(vcpus(".github/workflows/big.yml"), 4);
        assert_eq!(vcpus(".github/workflows/ci.yml"), 2);
    }

    #[test]
    fn runs_on_forms_give_labels() {
        let j = |v: serde_json::Value| runs_on_labels("j", &v);
        assert_eq!(j(serde_json::json!("big")), Ok(labels(&["big"])));
        assert_eq!(
            j(serde_json::json!(["self-hosted", "big"])),
            Ok(labels(&["self-hosted", "big"]))
        );
        assert_eq!(
            j(serde_json::json!({"group": "g", "labels": ["big"]})),
            Ok(labels(&["big"]))
        );
        assert_eq!(
            j(serde_json::json!({"group": "g", "labels": "big"})),
            Ok(labels(&["big"]))
        );
        assert_eq!(j(serde_json::json!({"group": "g"})), Ok(Vec::new()));
        let err = j(serde_json::json!({"labels": [1]})).expect_err("number");
        assert!(err.to_string().contains("Job `j`"), "{err}");
        assert!(j(serde_json::json!(3)).is_err());
        assert!(j(serde_json::json!({"size": "xl"})).is_err());
    }
}
