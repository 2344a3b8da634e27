//! The Lua scripts, each in the two forms the deployments need: as written, with `PUBLISH`,
//! and for Redis Cluster, with `SPUBLISH` (sharded pub/sub), so that a notice goes to the
//! subscribers on its channel's shard only, not over the cluster bus to every node. Every
//! notice channel of a script shares its keys' hash tag, so it is in the slot the script runs
//! on, as Cluster requires of a script's `SPUBLISH`.

use std::sync::OnceLock;

use redis::Script;

/// One script, its Cluster form made on first use.
pub(super) struct Lua {
    source: &'static str,
    plain: OnceLock<Script>,
    sharded: OnceLock<(String, Script)>,
}

impl Lua {
    pub(super) const fn new(source: &'static str) -> Self {
        Lua {
            source,
            plain: OnceLock::new(),
            sharded: OnceLock::new(),
        }
    }

    /// The script to run: on a cluster (`sharded`), with sharded pub/sub.
    pub(super) fn on(&self, sharded: bool) -> &Script {
        if sharded {
            &self.sharded().1
        } else {
            self.plain.get_or_init(|| Script::new(self.source))
        }
    }

    /// The script's code (to load it ahead of its first call).
    pub(super) fn code(&self, sharded: bool) -> &str {
        if sharded {
            &self.sharded().0
        } else {
            self.source
        }
    }

    fn sharded(&self) -> &(String, Script) {
        self.sharded.get_or_init(|| {
            let code = self.source.replace("'PUBLISH'", "'SPUBLISH'");
            let script = Script::new(&code);
            (code, script)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_form_publishes_with_spublish_only() {
        let release = Lua::new(include_str!("release.lua"));
        assert!(release.code(false).contains("'PUBLISH'"));
        assert!(release.code(true).contains("'SPUBLISH'"));
        assert!(!release.code(true).contains("'PUBLISH'"));
        assert_ne!(
            release.on(false).get_hash(),
            release.on(true).get_hash(),
            "two scripts, two hashes"
        );
    }
}
