try:
    from campaign.cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C before the run's own handlers are in place: nothing began
    code = 130
raise SystemExit(code)
