//! `micromsg`: the MicroMsg command-line client ([`micromsg_client::cli`]).

fn main() -> std::process::ExitCode {
    micromsg_client::cli::main()
}
