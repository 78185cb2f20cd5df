//! Tenant isolation at the proxy, with a real redis-server and real clients: the command policy
//! (users' and pods' ACL rules, the default tenant policy), secrets kept out of replies,
//! scripts bounded by the backend user's ACL, SCRIPT KILL for the script's owner, and the
//! failed-AUTH limits. Each test shows the attack fails and a bystander keeps working.
//!
//! Modules: `common` (helpers), `table` (the checked-in ACL category table against a live
//! redis-server), `policy` (NOPERM refusals, operators, secrets, per-pod policy and reload),
//! `scripts` (backend ACL bounds scripts; SCRIPT/FUNCTION KILL), `auth` (password guessing),
//! `admin` (CLIENT LIST/KILL and ACL WHOAMI/USERS/CAT/LOG answered by the proxy, per pod).

#[path = "tenant/common.rs"]
mod common;

#[path = "tenant/table.rs"]
mod table;

#[path = "tenant/policy.rs"]
mod policy;

#[path = "tenant/scripts.rs"]
mod scripts;

#[path = "tenant/auth.rs"]
mod auth;

#[path = "tenant/admin.rs"]
mod admin;
