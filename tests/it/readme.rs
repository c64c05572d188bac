//! README.md as a new user follows it, from a clean directory: the quick start's server, the
//! curl session, the configuration check and the custom handler's example run exactly as
//! written (in one shell, block after block, as in a terminal), and each output the README
//! shows is compared with what the block printed. The container section cannot run here (no
//! registry): deploy/smoke.sh runs it in CI, and the tests below check what can be checked
//! without Docker.
//!
//! The only changes made to the README's commands: `./target/release/labelhook` is the binary
//! under test, and the servers listen on free ports instead of 8080, 8081 and 9090 (their URLs
//! are swapped in the commands, and back in the outputs). Outputs are compared line by line
//! with runs of spaces collapsed, times and random 25-character ids (`c...`) masked, and a
//! README line `...` standing for any number of lines. The sections a reader may come to in a
//! new terminal ([`NEW_TERMINAL`]) run without the variables earlier sections exported, so
//! that a command there that needs one says so itself.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::helpers::*;

/// How long one README block may take.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// The sections whose `sh` blocks this file runs.
const RUN_HERE: [&str; 5] = [
    "Quick start",
    "Try it with curl",
    "Configuration",
    "Writing a handler in Rust",
    "Pointing Labelbox at labelhook",
];
/// The section deploy/smoke.sh runs, with Docker.
const RUN_BY_SMOKE_SH: &str = "Docker image";
/// Sections run as in a terminal of their own: only `PATH` and `HOME` are exported.
const NEW_TERMINAL: [&str; 1] = ["Configuration"];
/// The section tests/it/bench.rs runs: its numbers are the machine's of the moment, so that
/// test compares the shape of the output, not its numbers.
pub const RUN_BY_BENCH_TEST: &str = "How fast on your machine";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A fenced code block and the heading it is under.
#[derive(Debug, Clone)]
pub struct Block {
    pub lang: String,
    pub text: String,
    pub section: String,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut section = String::new();
    let mut open: Option<Block> = None;
    for line in markdown.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(lang)) => {
                open = Some(Block {
                    lang: lang.trim().to_owned(),
                    text: String::new(),
                    section: section.clone(),
                })
            }
            (Some(_), Some(_)) => found.extend(open.take()),
            (Some(block), None) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
            (None, None) => {
                if let Some(title) = line.strip_prefix('#').map(|t| t.trim_start_matches('#')) {
                    section = title.trim().to_owned();
                }
            }
        }
    }
    found
}

pub fn readme_blocks() -> Vec<Block> {
    blocks(&read("README.md"))
}

/// `sh` in a directory, fed README blocks one at a time, like a terminal: variables and
/// exports carry over from one block to the next.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Shell {
    fn start(dir: &Path) -> Shell {
        let mut child = Command::new("sh")
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let lines = stdout_lines(&mut child);
        let stdin = child.stdin.take().expect("stdin");
        let mut shell = Shell {
            child,
            stdin,
            lines,
        };
        // What the commands print on stderr is part of what a reader sees.
        shell.run("exec 2>&1");
        shell
    }

    /// Runs `script`; its output (stdout and stderr) and exit status.
    fn run(&mut self, script: &str) -> (String, i32) {
        // The newline before the marker ends an output without one (`head -c`).
        write!(self.stdin, "{script}\nprintf '\\n@@end %s\\n' \"$?\"\n").expect("write");
        self.stdin.flush().expect("flush");
        let deadline = Instant::now() + BLOCK_TIMEOUT;
        let mut output = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no end of {script:?} in time; so far:\n{output}"));
            if let Some(status) = line.strip_prefix("@@end ") {
                return (output, status.trim().parse().unwrap_or(-1));
            }
            output.push_str(&line);
            output.push('\n');
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A README output and an actual one, compared as the module says.
fn same_output(expected: &str, actual: &str) -> bool {
    let expected = normalized_lines(expected);
    let actual = normalized_lines(actual);
    fn matches(expected: &[String], actual: &[String]) -> bool {
        match expected.split_first() {
            None => actual.is_empty(),
            Some((line, rest)) if line == "..." => {
                (0..=actual.len()).any(|skip| matches(rest, &actual[skip..]))
            }
            Some((line, rest)) => actual
                .split_first()
                .is_some_and(|(first, others)| first == line && matches(rest, others)),
        }
    }
    matches(&expected, &actual)
}

fn normalized_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| mask(l).split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    lines
}

/// Replaces times (`2026-11-26T21:14:35.204Z`) by `<time>` and 25-character ids starting
/// with `c` (cuids, as Labelbox and `labelhook send` make them) by `<id>`.
fn mask(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if let Some(len) = time_at(&chars[i..]) {
            out.push_str("<time>");
            i += len;
            continue;
        }
        let word = |c: &char| c.is_ascii_lowercase() || c.is_ascii_digit();
        let starts_word = i == 0 || !word(&chars[i - 1]);
        if starts_word && chars[i] == 'c' {
            let len = chars[i..].iter().take_while(|c| word(c)).count();
            if len == 25 {
                out.push_str("<id>");
                i += len;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// The length of an RFC 3339 UTC time at the start of `chars`, if there is one.
fn time_at(chars: &[char]) -> Option<usize> {
    let shape = "dddd-dd-ddTdd:dd:dd";
    if chars.len() < shape.len() {
        return None;
    }
    let fits = shape.chars().zip(chars).all(|(s, c)| match s {
        'd' => c.is_ascii_digit(),
        other => other == *c,
    });
    if !fits {
        return None;
    }
    let mut len = shape.len();
    if chars.get(len) == Some(&'.') {
        len += 1 + chars[len + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
    }
    (chars.get(len) == Some(&'Z')).then_some(len + 1)
}

/// Copies a configuration of the repository into `dir`, its listeners on free ports; the
/// admin address it had, when it has one.
fn copy_config(dir: &Path, path: &str, readme_addr: &str) -> Option<String> {
    let text = read(path);
    let listen = format!("listen = \"{readme_addr}\"");
    assert!(text.contains(&listen), "{path} has no {listen}");
    let mut admin = None;
    let text: Vec<String> = text
        .lines()
        .map(|line| {
            if let Some(value) = line.strip_prefix("admin_listen = \"") {
                admin = value.split('"').next().map(str::to_owned);
                "admin_listen = \"127.0.0.1:0\"".to_owned()
            } else {
                line.replace(&listen, "listen = \"127.0.0.1:0\"")
            }
        })
        .collect();
    let target = dir.join(path);
    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
    std::fs::write(target, text.join("\n") + "\n").expect("write");
    admin
}

/// `script` in a subshell without the variables exported so far, but `PATH` and `HOME`: as
/// a reader would run it in a new terminal.
fn in_new_terminal(script: &str) -> String {
    format!(
        "(\nfor name in $(env | sed -n 's/^\\([A-Za-z_][A-Za-z0-9_]*\\)=.*/\\1/p'); do\n  \
         case $name in PATH|HOME|PWD) ;; *) unset \"$name\" ;; esac\ndone\n{script}\n)"
    )
}

/// The environment variables a README command sets before `cargo`
/// (`LABELBOX_WEBHOOK_SECRET=devsecret cargo run ...`).
fn assignments(command: &str) -> Vec<(String, String)> {
    command
        .split_whitespace()
        .take_while(|word| *word != "cargo")
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The example's binary, built by `cargo test` (not by `cargo test --test it`).
fn example_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let path = profile_dir.join("examples").join("custom_handler");
    path.exists().then_some(path)
}

/// The README's servers, started as its `cargo run` blocks say.
enum Started {
    Server(Listening),
    Skipped,
}

fn start_server(dir: &Path, command: &str) -> (Started, Vec<(String, String)>) {
    let (program, args, config, readme_addr): (PathBuf, &[&str], &str, &str) =
        if command.contains("--example custom_handler") {
            let Some(example) = example_binary() else {
                let required = std::env::var_os("CI").is_some()
                    || std::env::var_os("LABELHOOK_REQUIRE_SERVICES").is_some();
                assert!(
                    !required,
                    "target/*/examples/custom_handler is missing: run the whole `cargo test`"
                );
                eprintln!(
                    "skipped the custom handler example: not built (`cargo test --test it` \
                     does not build examples; `cargo test` does)"
                );
                return (Started::Skipped, Vec::new());
            };
            (
                example,
                &[],
                "examples/custom_handler.toml",
                "127.0.0.1:8081",
            )
        } else if command.contains("-- serve") {
            (
                PathBuf::from(bin()),
                &["serve"],
                "config/labelhook.toml",
                "127.0.0.1:8080",
            )
        } else {
            panic!("a `cargo run` block this test does not know: {command}")
        };
    let readme_admin = copy_config(dir, config, readme_addr);
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(assignments(command));
    let log = dir.join(format!("{}.log", config.replace('/', "_")));
    let server = Listening::start(cmd, &log);
    let mut swaps = vec![(format!("http://{readme_addr}"), server.url.clone())];
    if let (Some(readme), Some(actual)) = (readme_admin, &server.admin_url) {
        swaps.push((format!("http://{readme}"), actual.clone()));
    }
    (Started::Server(server), swaps)
}

/// What a server printed at start: its `listening on` line and, when it has one, its
/// `admin listening on` line.
fn start_lines(server: &Listening) -> String {
    match &server.admin_url {
        Some(admin) => format!("{}\nadmin listening on {admin}\n", server.line),
        None => format!("{}\n", server.line),
    }
}

#[test]
fn the_readme_runs_as_written_from_a_clean_directory() {
    let dir = tempfile::tempdir().expect("temp");
    let binary = bin();
    let mut shell = Shell::start(dir.path());
    // (the README's URL, the one of the server started here)
    let mut swaps: Vec<(String, String)> = Vec::new();
    let mut servers: Vec<Listening> = Vec::new();
    let mut example: Option<usize> = None;
    let mut last_command: Option<String> = None;
    // The output of the block just run, until the README block after it is compared with it.
    let mut unchecked: Option<String> = None;
    // A section left out: the example's, when the example was not built.
    let mut skipped_section: Option<String> = None;
    let mut ran = 0;

    let pending_done = |dir: &Path| {
        // The quick start's deliveries are handled before the next command, as they are
        // while a reader reads the next paragraph.
        if !dir.join("data/labelhook.db").exists() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(binary)
                .args(["events", "list", "--json", "--status", "pending"])
                .current_dir(dir)
                .env_remove("LABELHOOK_CONFIG")
                .output()
                .expect("run events list");
            if out.status.success() && out.stdout.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "{}", output_text(&out));
            std::thread::park_timeout(Duration::from_millis(50));
        }
    };
    let unswap = |output: String, swaps: &[(String, String)]| {
        swaps.iter().fold(output, |o, (readme, actual)| {
            o.replace(actual.as_str(), readme)
        })
    };

    for block in readme_blocks() {
        if !RUN_HERE.contains(&block.section.as_str())
            || skipped_section.as_deref() == Some(block.section.as_str())
        {
            continue;
        }
        match block.lang.as_str() {
            "sh" if block.text.contains("cargo test") => {
                // This very test is part of it.
                last_command = None;
            }
            "sh" if block.text.contains("cargo run") => {
                last_command = None;
                let (started, swap) = start_server(dir.path(), &block.text);
                match started {
                    Started::Server(server) => {
                        swaps.extend(swap);
                        unchecked = Some(unswap(start_lines(&server), &swaps));
                        if block.text.contains("--example") {
                            example = Some(servers.len());
                        }
                        servers.push(server);
                    }
                    Started::Skipped => skipped_section = Some(block.section.clone()),
                }
            }
            "sh" => {
                pending_done(dir.path());
                let mut script = block.text.replace("./target/release/labelhook", binary);
                for (readme, actual) in &swaps {
                    script = script.replace(readme, actual);
                }
                if NEW_TERMINAL.contains(&block.section.as_str()) {
                    script = in_new_terminal(&script);
                }
                let (output, status) = shell.run(&script);
                ran += 1;
                let output = unswap(output, &swaps);
                if status != 0 && !output.starts_with("error: ") {
                    panic!("exit status {status}:\n{}\n{output}", block.text);
                }
                last_command = Some(script);
                unchecked = Some(output);
            }
            "" => {
                let actual = match unchecked.take() {
                    Some(actual) => actual,
                    None => {
                        // An output after prose: "the same command again".
                        let command = last_command.clone().unwrap_or_else(|| {
                            panic!("an output with no command before it:\n{}", block.text)
                        });
                        pending_done(dir.path());
                        unswap(shell.run(&command).0, &swaps)
                    }
                };
                assert!(
                    same_output(&block.text, &actual),
                    "in \"{}\", README.md shows\n{}\nbut the command printed\n{actual}",
                    block.section,
                    block.text
                );
            }
            _ => {}
        }
    }
    assert!(ran >= 10, "only {ran} blocks ran");

    // The example handled what `send` sent it, beside the quick start's server.
    if let Some(example) = example.map(|i| &servers[i]) {
        example.wait_for_log("label counted");
        let logs = example.logs();
        assert!(logs.contains("clabel0000000000000000001"), "{logs}");
    }
}

#[test]
fn every_sh_block_and_every_output_of_the_readme_is_run_here_or_by_deploy_smoke_sh() {
    // An output is a block without a language (anything else says what it is: `text`,
    // `toml`...), and is compared with what the command before it printed.
    for block in readme_blocks()
        .iter()
        .filter(|b| b.lang == "sh" || b.lang.is_empty())
    {
        assert!(
            RUN_HERE.contains(&block.section.as_str())
                || block.section == RUN_BY_SMOKE_SH
                || block.section == RUN_BY_BENCH_TEST,
            "a {} block under \"{}\" that no test runs:\n{}",
            if block.lang.is_empty() {
                "output"
            } else {
                "sh"
            },
            block.section,
            block.text
        );
    }
    let smoke = read("deploy/smoke.sh");
    assert!(smoke.contains(&format!("section '### {RUN_BY_SMOKE_SH}'")));
    assert!(read("README.md").contains(&format!("\n### {RUN_BY_SMOKE_SH}\n")));
    let workflow = read(".github/workflows/ci.yml");
    assert!(
        workflow.contains("run: deploy/smoke.sh"),
        "CI does not run deploy/smoke.sh"
    );
}

#[test]
fn the_readmes_handler_is_the_examples_code() {
    let block = readme_blocks()
        .into_iter()
        .find(|b| b.section == "Writing a handler in Rust" && b.lang == "rust")
        .expect("the rust block");
    let example = read("examples/custom_handler.rs");
    let (handler, main) = block
        .text
        .split_once("// in main")
        .expect("the `// in main` part");
    assert!(
        example.contains(handler.trim()),
        "the README's handler is not examples/custom_handler.rs's:\n{handler}"
    );
    let squeeze = |s: &str| s.split_whitespace().collect::<String>();
    let register = main.lines().last().expect("the register line");
    assert!(
        squeeze(&example).contains(&squeeze(register)),
        "{register} is not in the example"
    );
}

#[test]
fn the_readme_names_every_program_the_tests_run() {
    let mut programs: BTreeSet<String> = ["sh", "cat", "head", "curl", "openssl"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    for dir in ["tests/it", "tests/store", "tests/common"] {
        for entry in std::fs::read_dir(repo().join(dir)).expect("read dir") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            for piece in text.split("Command::new(\"").skip(1) {
                if let Some((name, _)) = piece.split_once('"') {
                    programs.insert(name.to_owned());
                }
            }
        }
    }
    let readme = read("README.md");
    let quick_start = readme
        .split("## Quick start")
        .nth(1)
        .and_then(|s| s.split("### Try it with curl").next())
        .expect("the quick start");
    for program in programs {
        assert!(
            quick_start.contains(&format!("`{program}`")),
            "the tests run {program}, which README.md's quick start does not name"
        );
    }
}

#[test]
fn the_container_section_and_the_image_agree() {
    let readme = read("README.md");
    let dockerfile = read("Dockerfile");
    // The configuration the README mounts is valid.
    let block = readme_blocks()
        .into_iter()
        .find(|b| b.section == RUN_BY_SMOKE_SH && b.text.contains("try-container/labelhook.toml"))
        .expect("the block that writes the container's configuration");
    let toml = block
        .text
        .split_once("<<'EOF'\n")
        .and_then(|(_, rest)| rest.split_once("\nEOF\n"))
        .map(|(toml, _)| toml)
        .expect("a heredoc");
    let dir = tempfile::tempdir().expect("temp");
    let path = dir.path().join("labelhook.toml");
    std::fs::write(&path, toml).expect("write");
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .env("LABELBOX_WEBHOOK_SECRET", "x")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", output_text(&out));

    // A mounted file is what configures the image: no LABELHOOK__ variable overrides it.
    for line in dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        assert!(!line.contains("LABELHOOK__"), "the Dockerfile sets {line}");
    }
    assert!(
        dockerfile.contains("COPY config/labelhook.container.toml /etc/labelhook/labelhook.toml")
    );
    assert!(read(".dockerignore").contains("!config/labelhook.container.toml"));
    // Healthy means ready.
    let healthcheck = dockerfile
        .split("HEALTHCHECK")
        .nth(1)
        .and_then(|s| s.split("ENTRYPOINT").next())
        .expect("a HEALTHCHECK");
    assert!(
        healthcheck.contains(r#"CMD ["/usr/local/bin/labelhook", "healthcheck", "--ready"]"#),
        "{healthcheck}"
    );
    // Stripped, with a profile of its own, and the crate versions embedded for scanners.
    assert!(dockerfile.contains("cargo auditable build --profile docker --locked"));
    // Only what every engine the README names knows (issue 22): Engine 20.10's legacy builder
    // refuses HEALTHCHECK --start-interval, and RUN --mount; a `# syntax=` line makes
    // BuildKit fetch a frontend from a registry.
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    for newer in ["--start-interval", "RUN --mount"] {
        assert!(
            !instructions.iter().any(|l| l.contains(newer)),
            "the Dockerfile uses {newer}"
        );
    }
    let first = dockerfile.lines().next().unwrap_or_default();
    assert!(!first.replace(' ', "").starts_with("#syntax="), "{first}");
    let cargo = read("Cargo.toml");
    let profile = cargo
        .split("[profile.docker]")
        .nth(1)
        .expect("[profile.docker]");
    assert!(profile.contains("strip = \"symbols\""), "{profile}");
    // The user, and what a bind mount needs.
    assert!(dockerfile.contains("USER 65532:65532"));
    assert!(readme.contains("uid 65532") && readme.contains("chown -R 65532:65532"));
}

#[test]
fn the_workflow_runs_current_actions_and_the_oldest_rust() {
    let workflow = read(".github/workflows/ci.yml");
    for old in ["actions/checkout@v4", "@v3", "rust-cache@v2\n"] {
        assert!(!workflow.contains(old), "the workflow still uses {old}");
    }
    for job in ["msrv:", "lint:", "docker:", "test:"] {
        assert!(workflow.contains(&format!("\n  {job}\n")), "no {job} job");
    }
    assert!(workflow.contains("LABELHOOK_REQUIRE_SERVICES: \"1\""));
    // After the README's test command, the checkout is as it was: the tests write only into
    // temporary directories (see tests/it/browser.rs for the screenshots).
    for (file, text) in [
        (".github/workflows/ci.yml", &workflow),
        (".ci/run", &read(".ci/run")),
    ] {
        let after = text
            .split("cargo test --locked")
            .nth(1)
            .unwrap_or_else(|| panic!("{file} does not run the README's test command"));
        assert!(
            after.contains("git status --porcelain --untracked-files=all"),
            "{file} does not check the checkout after the tests"
        );
    }
    assert!(workflow.contains("rust-version"));
    assert!(workflow.contains("rhysd/actionlint"));
}

#[test]
fn masking_keeps_what_is_stable() {
    assert_eq!(
        mask("2026-11-26T21:14:35.204Z  c482d35uq5v7rpgogsqqigm1d  ctest0000000000000000000001"),
        "<time>  <id>  ctest0000000000000000000001"
    );
    assert!(same_output("a\n...\nd\n", "a\nb\nc\nd\n\n"));
    assert!(!same_output("a\nd\n", "a\nb\nd\n"));
}
