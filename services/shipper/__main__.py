from services.shipper.app import main

main()
