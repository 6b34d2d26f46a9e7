from lightning_ctx.cli.app import main

main()
