//! Man pages and shell completions of the xvtpm binaries, made from their clap definitions
//! (each binary's hidden `generate-docs DIR`), so the packages' documentation never drifts
//! from the options the binaries take.

use std::io;
use std::path::Path;

use clap::Command;
use clap_complete::Shell;

/// Writes `cmd`'s documentation under `dir`: `man1/<name>.1` and one `man1/<name>-<sub>.1`
/// per visible subcommand (recursively), and `completions/<name>.bash`, `_<name>` (zsh) and
/// `<name>.fish`.
pub fn generate(mut cmd: Command, dir: &Path) -> io::Result<()> {
    cmd.build();
    let man = dir.join("man1");
    std::fs::create_dir_all(&man)?;
    write_pages(&cmd, cmd.get_name(), &man)?;
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    let name = cmd.get_name().to_string();
    for (shell, file) in
        [(Shell::Bash, format!("{name}.bash")), (Shell::Zsh, format!("_{name}")), (Shell::Fish, format!("{name}.fish"))]
    {
        let mut out = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut out);
    }
    Ok(())
}

/// `cmd`'s page as `<title>.1`, then its subcommands' as `<title>-<sub>.1`.
fn write_pages(cmd: &Command, title: &str, dir: &Path) -> io::Result<()> {
    let page = cmd.clone().name(title.to_string());
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    std::fs::write(dir.join(format!("{title}.1")), out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_pages(sub, &format!("{title}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    #[test]
    fn pages_and_completions_for_each_visible_subcommand() {
        let cmd = Command::new("demo")
            .about("A demo")
            .subcommand(
                Command::new("serve")
                    .about("Serve it")
                    .arg(Arg::new("state-dir").long("state-dir").help("Where the state lives")),
            )
            .subcommand(Command::new("secret").hide(true))
            .subcommand(Command::new("group").subcommand(Command::new("new").about("A new group")))
            .arg(Arg::new("verbose").long("verbose").action(ArgAction::SetTrue));
        let dir = std::env::temp_dir().join(format!("xvtpm-docs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        generate(cmd, &dir).expect("generate");
        let mut pages: Vec<_> = std::fs::read_dir(dir.join("man1"))
            .expect("man1")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        pages.sort();
        assert_eq!(pages, ["demo-group-new.1", "demo-group.1", "demo-serve.1", "demo.1"]);
        let serve = std::fs::read_to_string(dir.join("man1/demo-serve.1")).expect("page");
        assert!(serve.contains(".TH demo-serve 1") && serve.contains("state\\-dir"), "{serve}");
        let bash = std::fs::read_to_string(dir.join("completions/demo.bash")).expect("bash");
        assert!(bash.contains("--state-dir") && bash.contains("complete"), "{bash}");
        assert!(dir.join("completions/_demo").is_file() && dir.join("completions/demo.fish").is_file());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
