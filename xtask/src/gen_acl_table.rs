//! `cargo xtask gen-acl-table`: starts a scratch redis-server (on a unix socket) and writes the
//! ACL categories of every command and subcommand from its `COMMAND` reply to
//! `datamesh-proxy/src/commands/acl_categories.txt`, the table the proxy's command policy
//! (`users[].acl`, `pods[].acl`, `proxy.default_acl`) is evaluated against.

use anyhow::Result;

pub fn run() -> Result<()> {
    let (path, version) = datamesh_tests::acl_table::generate(&crate::util::project_root())?;
    println!(
        "wrote {} from redis-server {version}; rebuild the proxy to use it",
        path.display()
    );
    Ok(())
}
