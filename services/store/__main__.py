from services.store.app import main

main()
