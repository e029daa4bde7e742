//! `micromsg-broker`: runs a MicroMsg broker. The command line is [`micromsg_broker::cli`].
fn main() -> std::process::ExitCode {
    micromsg_broker::cli::main()
}
