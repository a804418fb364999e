//! `--print-capabilities`: the JSON object QEMU's backend program conventions ask for.

use serde::Serialize;

/// What `--print-capabilities` prints: `{"type": "...", "features": [...]}`.
#[derive(Debug, Serialize)]
pub struct Capabilities<'a> {
    /// The device type as QEMU's vhost-user.json names it (`block-device`, `net`, ...).
    #[serde(rename = "type")]
    pub device_type: &'a str,
    /// Optional features of the backend program (e.g. `read-only`).
    pub features: &'a [&'a str],
}

impl Capabilities<'_> {
    /// The capabilities as a single-line JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_qemu_shape() {
        let caps = Capabilities {
            device_type: "block-device",
            features: &["read-only"],
        };
        assert_eq!(
            caps.to_json(),
            r#"{"type":"block-device","features":["read-only"]}"#
        );
    }
}
