//! `--print-capabilities`: the JSON object QEMU's backend program conventions ask for
//! (`docs/interop/vhost-user.rst`), in the shape of `VHostUserBackendCapabilities` from
//! QEMU's `docs/interop/vhost-user.json`: `{"type": "block", "features": ["read-only"]}`.
//!
//! The schema names the device types (`VHostUserBackendType`) and, for some types, the
//! optional command-line features a backend may announce. A type without a feature list in
//! the schema prints `type` alone: management software parses these objects strictly.

use serde::Serialize;

/// Device types of QEMU's `VHostUserBackendType` that this workspace's daemons serve.
pub mod device_type {
    /// virtio block (`vhost-device-blk`).
    pub const BLOCK: &str = "block";
    /// virtio net (`vhost-device-net`).
    pub const NET: &str = "net";
    /// virtio vsock (`vhost-device-vsock`).
    pub const VSOCK: &str = "vsock";
    /// virtio console (`vhost-device-console`).
    pub const CONSOLE: &str = "console";
}

/// Every value of QEMU's `VHostUserBackendType` enum.
pub const QEMU_TYPES: &[&str] = &[
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
];

/// The features QEMU's schema defines for a device type (empty when it defines none).
pub fn qemu_features(device_type: &str) -> &'static [&'static str] {
    match device_type {
        // VHostUserBackendBlockFeature: `--read-only`, `--blk-file PATH`.
        "block" => &["read-only", "blk-file"],
        // VHostUserBackendInputFeature.
        "input" => &["evdev-path", "no-grab"],
        // VHostUserBackendGPUFeature.
        "gpu" => &["render-node", "virgl"],
        _ => &[],
    }
}

/// What does not match QEMU's schema.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a `VHostUserBackendType`.
    #[error("`{0}` is not a vhost-user backend type of QEMU's vhost-user.json")]
    UnknownType(String),
    /// Not a feature the schema defines for the type.
    #[error(
        "`{feature}` is not a feature QEMU's vhost-user.json defines for type `{device_type}`"
    )]
    UnknownFeature {
        /// The type.
        device_type: String,
        /// The feature.
        feature: String,
    },
}

/// What `--print-capabilities` prints: `{"type": "...", "features": [...]}`.
#[derive(Debug, Serialize)]
pub struct Capabilities<'a> {
    /// The device type as QEMU's vhost-user.json names it (see [`device_type`]).
    #[serde(rename = "type")]
    pub device_type: &'a str,
    /// Optional features of the backend program (e.g. `read-only`); left out of the JSON
    /// when empty, since most types have no feature list in the schema.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub features: &'a [&'a str],
}

impl Capabilities<'_> {
    /// The capabilities as a single-line JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// Checks the type and features against QEMU's schema.
    pub fn validate(&self) -> Result<(), Error> {
        if !QEMU_TYPES.contains(&self.device_type) {
            return Err(Error::UnknownType(self.device_type.to_string()));
        }
        let allowed = qemu_features(self.device_type);
        match self.features.iter().find(|f| !allowed.contains(f)) {
            Some(f) => Err(Error::UnknownFeature {
                device_type: self.device_type.to_string(),
                feature: (*f).to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Prints the capabilities to stdout, the one place a daemon writes there on purpose.
    pub fn print(&self) {
        println!("{}", self.to_json());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_qemu_shape() {
        let caps = Capabilities {
            device_type: device_type::BLOCK,
            features: &["read-only"],
        };
        assert_eq!(
            caps.to_json(),
            r#"{"type":"block","features":["read-only"]}"#
        );
        assert_eq!(caps.validate(), Ok(()));
    }

    #[test]
    fn types_without_features_print_type_alone() {
        for t in [device_type::NET, device_type::VSOCK, device_type::CONSOLE] {
            let caps = Capabilities {
                device_type: t,
                features: &[],
            };
            assert_eq!(caps.to_json(), format!(r#"{{"type":"{t}"}}"#));
            assert_eq!(caps.validate(), Ok(()));
        }
    }

    #[test]
    fn validation_refuses_what_qemu_does_not_know() {
        let caps = Capabilities {
            device_type: "block-device",
            features: &[],
        };
        assert!(matches!(caps.validate(), Err(Error::UnknownType(_))));
        let caps = Capabilities {
            device_type: "net",
            features: &["read-only"],
        };
        assert!(matches!(caps.validate(), Err(Error::UnknownFeature { .. })));
    }
}
